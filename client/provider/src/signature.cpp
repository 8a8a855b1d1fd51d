// Signatures with hsm keys: ECDSA (DER), RSA PKCS#1 v1.5 and PSS, Ed25519.
//
// Signing goes to the agent: for ECDSA and RSA as a digest (digest-sign hashes here, with the
// default provider, and sends the hash: one small request whatever the message size); Ed25519
// signs the whole message, which the agent's sign takes as data. Everything else, verification
// and the AlgorithmIdentifier that certificates and CSRs carry, is the default provider's work
// on the public key: each context keeps a "shadow" verification context over that key with the
// same settings, so that no ASN.1 or parameter rule is written twice.
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <cstring>
#include <new>

#include "dispatch.hpp"
#include "key.hpp"

namespace hsm::provider {
namespace {

/// The hashes an alg can carry: the suffix of RS/PS names and the digest length.
struct HashAlg {
  int nid;
  const char* suffix;
};
constexpr HashAlg kHashes[] = {{NID_sha256, "256"}, {NID_sha384, "384"}, {NID_sha512, "512"}};

struct SignatureCtx {
  ProviderContext* provider;
  KeyKind kind;
  std::shared_ptr<const HsmKey> key;
  EvpMdPtr md;          // the hash, when one is set
  EvpMdCtxPtr hashing;  // digest-sign: the running hash of the message
  int padding = RSA_PKCS1_PADDING;
  int saltlen = RSA_PSS_SALTLEN_DIGEST;
  std::string mgf1;       // "" = the signature's hash
  EvpPkeyCtxPtr shadow;   // sign/verify: the default provider's context over the public key
  EvpMdCtxPtr shadow_md;  // digest-sign/verify: the same, owning its EVP_PKEY_CTX

  [[nodiscard]] EVP_PKEY_CTX* shadow_pkey_ctx() const {
    if (shadow) return shadow.get();
    return shadow_md ? EVP_MD_CTX_get_pkey_ctx(shadow_md.get()) : nullptr;
  }
};

SignatureCtx* ctx_of(void* ctx) {
  return static_cast<SignatureCtx*>(ctx);
}

template <KeyKind K>
void* sig_newctx(void* provctx, const char* /*propq*/) {
  return new (std::nothrow) SignatureCtx{static_cast<ProviderContext*>(provctx), K};
}

void sig_freectx(void* ctx) {
  delete ctx_of(ctx);
}

void* sig_dupctx(void* ctx) {
  const auto* from = ctx_of(ctx);
  auto* to =
      new (std::nothrow) SignatureCtx{from->provider, from->kind,    from->key,     nullptr,
                                      nullptr,        from->padding, from->saltlen, from->mgf1};
  if (to == nullptr) return nullptr;
  bool ok = true;
  if (from->md) {
    ok = EVP_MD_up_ref(from->md.get()) == 1;
    if (ok) to->md.reset(from->md.get());
  }
  if (ok && from->hashing) {
    to->hashing.reset(EVP_MD_CTX_new());
    ok = to->hashing && EVP_MD_CTX_copy_ex(to->hashing.get(), from->hashing.get()) == 1;
  }
  if (ok && from->shadow) {
    to->shadow.reset(EVP_PKEY_CTX_dup(from->shadow.get()));
    ok = to->shadow != nullptr;
  }
  if (ok && from->shadow_md) {
    to->shadow_md.reset(EVP_MD_CTX_new());
    ok = to->shadow_md && EVP_MD_CTX_copy_ex(to->shadow_md.get(), from->shadow_md.get()) == 1;
  }
  if (!ok) {
    delete to;
    return nullptr;
  }
  return to;
}

int sig_set_ctx_params(void* vctx, const OSSL_PARAM params[]);

/// Common to every init: the key, the hash and the shadow context. `digest` says whether this
/// is a digest-sign/verify init (hash here) or a sign/verify one (the caller hashed).
int sig_init(SignatureCtx* ctx, void* provkey, const char* mdname, bool digest, bool signing,
             const OSSL_PARAM params[]) {
  auto& provider = *ctx->provider;
  if (provkey != nullptr) ctx->key = static_cast<KeyData*>(provkey)->key;
  if (!ctx->key) {
    provider.raise(kReasonInternal, "no key");
    return 0;
  }
  if (signing && !ctx->key->can_sign()) {
    provider.raise(kReasonNoPrivateKey,
                   "this is a public key only (imported from elsewhere): it cannot sign");
    return 0;
  }
  if (mdname != nullptr && *mdname == '\0') mdname = nullptr;
  if (ctx->kind == KeyKind::kEd25519 && mdname != nullptr) {
    provider.raise(kReasonNotSupported, "Ed25519 signs the whole message: no digest (got %s)",
                   mdname);
    return 0;
  }
  ctx->md.reset(mdname != nullptr ? EVP_MD_fetch(provider.libctx(), mdname, nullptr) : nullptr);
  if (mdname != nullptr && !ctx->md) {
    provider.raise(kReasonNotSupported, "unknown digest %s", mdname);
    return 0;
  }
  ctx->hashing.reset();
  ctx->shadow.reset();
  ctx->shadow_md.reset();
  EVP_PKEY* pub = ctx->key->pub.get();
  if (digest) {
    if (ctx->md) {
      ctx->hashing.reset(EVP_MD_CTX_new());
      if (!ctx->hashing || EVP_DigestInit_ex2(ctx->hashing.get(), ctx->md.get(), nullptr) != 1) {
        provider.raise(kReasonInternal, "cannot start hashing with %s", mdname);
        return 0;
      }
    }
    ctx->shadow_md.reset(EVP_MD_CTX_new());
    if (!ctx->shadow_md || EVP_DigestVerifyInit_ex(ctx->shadow_md.get(), nullptr, mdname,
                                                   provider.libctx(), nullptr, pub, nullptr) != 1) {
      provider.raise(kReasonInternal, "cannot set up %s with this key", mdname ? mdname : "it");
      return 0;
    }
  } else {
    ctx->shadow.reset(EVP_PKEY_CTX_new_from_pkey(provider.libctx(), pub, nullptr));
    if (!ctx->shadow || EVP_PKEY_verify_init(ctx->shadow.get()) != 1) {
      provider.raise(kReasonInternal, "cannot set up a verification with this key");
      return 0;
    }
    if (ctx->md && EVP_PKEY_CTX_set_signature_md(ctx->shadow.get(), ctx->md.get()) != 1) return 0;
  }
  return sig_set_ctx_params(ctx, params);
}

int sig_sign_init(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  return sig_init(ctx_of(ctx), provkey, nullptr, false, true, params);
}
int sig_verify_init(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  return sig_init(ctx_of(ctx), provkey, nullptr, false, false, params);
}
int sig_digest_sign_init(void* ctx, const char* mdname, void* provkey, const OSSL_PARAM params[]) {
  return sig_init(ctx_of(ctx), provkey, mdname, true, true, params);
}
int sig_digest_verify_init(void* ctx, const char* mdname, void* provkey,
                           const OSSL_PARAM params[]) {
  return sig_init(ctx_of(ctx), provkey, mdname, true, false, params);
}

/// The digest size of an ES* alg: ES256/ES256K 32, ES384 48, ES512 64.
std::size_t ecdsa_digest_size(std::string_view alg) {
  if (alg.starts_with("ES384")) return 48;
  if (alg.starts_with("ES512")) return 64;
  return 32;
}

/// Signs `tbs` (a digest for ECDSA and RSA, the message for Ed25519) with the agent.
int sign_input(SignatureCtx* ctx, unsigned char* sig, size_t* siglen, size_t sigsize,
               const unsigned char* tbs, size_t tbslen) {
  auto& provider = *ctx->provider;
  const HsmKey& key = *ctx->key;
  SignRequest request;
  std::vector<std::uint8_t> digest;
  switch (ctx->kind) {
    case KeyKind::kEc: {
      // The agent takes the digest length of the key's alg (32 bytes for ES256). ECDSA itself
      // uses the leftmost bits of a longer hash and a shorter one as a number, so cutting a
      // longer digest to that length, or left-padding a shorter one with zeros, gives the
      // signature OpenSSL and every verifier expect (a P-256 key with SHA-384, SHA-1, ...).
      const std::size_t size = ecdsa_digest_size(key.alg);
      digest.assign(size, 0);
      const std::size_t used = std::min(size, tbslen);
      std::copy_n(tbs, used, digest.end() - static_cast<std::ptrdiff_t>(used));
      request = SignRequest{key.alg, true, digest, true};
      break;
    }
    case KeyKind::kRsa: {
      if (!ctx->md) {
        provider.raise(kReasonNotSupported,
                       "an RSA signature by hsm-agent needs its digest named "
                       "(e.g. openssl pkeyutl -pkeyopt digest:sha256)");
        return 0;
      }
      const int nid = EVP_MD_get_type(ctx->md.get());
      const auto* hash = std::find_if(std::begin(kHashes), std::end(kHashes),
                                      [&](const HashAlg& h) { return h.nid == nid; });
      if (hash == std::end(kHashes)) {
        provider.raise(kReasonNotSupported, "RSA with %s: hsm-agent signs SHA-256/384/512 only",
                       EVP_MD_get0_name(ctx->md.get()));
        return 0;
      }
      const auto md_size = static_cast<std::size_t>(EVP_MD_get_size(ctx->md.get()));
      if (tbslen != md_size) {
        provider.raise(kReasonNotSupported, "a %s digest is %zu bytes, got %zu",
                       EVP_MD_get0_name(ctx->md.get()), md_size, tbslen);
        return 0;
      }
      std::string alg;
      if (ctx->padding == RSA_PKCS1_PADDING) {
        alg = std::string("RS") + hash->suffix;
      } else if (ctx->padding == RSA_PKCS1_PSS_PADDING) {
        // The agent's PSS is MGF1 with the same hash and salt = hash length: what TLS 1.3 uses
        // (RSA_PSS_SALTLEN_DIGEST). "auto" is a verifier's setting; it accepts this salt too.
        const bool salt_ok = ctx->saltlen == RSA_PSS_SALTLEN_DIGEST ||
                             ctx->saltlen == RSA_PSS_SALTLEN_AUTO ||
                             ctx->saltlen == static_cast<int>(md_size);
        const bool mgf1_ok = ctx->mgf1.empty() || EVP_MD_is_a(ctx->md.get(), ctx->mgf1.c_str());
        if (!salt_ok || !mgf1_ok) {
          provider.raise(kReasonNotSupported,
                         "RSA-PSS by hsm-agent uses MGF1 with the signature's hash and a salt "
                         "of the hash length (rsa_pss_saltlen:digest), got salt length %d%s",
                         ctx->saltlen, mgf1_ok ? "" : " and another MGF1 hash");
          return 0;
        }
        alg = std::string("PS") + hash->suffix;
      } else {
        provider.raise(kReasonNotSupported,
                       "RSA padding mode %d: hsm-agent signs PKCS#1 v1.5 and PSS only",
                       ctx->padding);
        return 0;
      }
      request = SignRequest{std::move(alg), true, {tbs, tbslen}, false};
      break;
    }
    case KeyKind::kEd25519:
      request = SignRequest{"EdDSA", false, {tbs, tbslen}, false};
      break;
  }
  auto signature = sign_with_agent(provider, key, request);
  if (!signature) return 0;
  if (signature->size() > sigsize) {
    provider.raise(kReasonInternal, "the signature (%zu bytes) does not fit the buffer (%zu)",
                   signature->size(), sigsize);
    return 0;
  }
  std::copy(signature->begin(), signature->end(), sig);
  *siglen = signature->size();
  return 1;
}

/// The largest signature of the context's key (OpenSSL's size query: sig == nullptr).
int signature_size(const SignatureCtx* ctx, size_t* siglen) {
  const int size = EVP_PKEY_get_size(ctx->key->pub.get());
  if (size <= 0) return 0;
  *siglen = static_cast<size_t>(size);
  return 1;
}

int sig_sign(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize,
             const unsigned char* tbs, size_t tbslen) {
  auto* ctx = ctx_of(vctx);
  if (sig == nullptr) return signature_size(ctx, siglen);
  if (ctx->kind == KeyKind::kEd25519) {
    ctx->provider->raise(kReasonNotSupported,
                         "Ed25519 signs a whole message: use a digest-sign (EVP_DigestSign, "
                         "openssl pkeyutl -rawin)");
    return 0;
  }
  return sign_input(ctx, sig, siglen, sigsize, tbs, tbslen);
}

int sig_verify(void* vctx, const unsigned char* sig, size_t siglen, const unsigned char* tbs,
               size_t tbslen) {
  auto* ctx = ctx_of(vctx);
  return EVP_PKEY_verify(ctx->shadow.get(), sig, siglen, tbs, tbslen) == 1 ? 1 : 0;
}

int sig_digest_sign_update(void* vctx, const unsigned char* data, size_t datalen) {
  auto* ctx = ctx_of(vctx);
  if (!ctx->hashing) {
    ctx->provider->raise(kReasonNotSupported,
                         "Ed25519 signs a whole message at once: use EVP_DigestSign");
    return 0;
  }
  return EVP_DigestUpdate(ctx->hashing.get(), data, datalen);
}

int sig_digest_sign_final(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize) {
  auto* ctx = ctx_of(vctx);
  if (sig == nullptr) return signature_size(ctx, siglen);
  if (!ctx->hashing) return 0;
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_DigestFinal_ex(ctx->hashing.get(), digest, &digest_len) != 1) return 0;
  return sign_input(ctx, sig, siglen, sigsize, digest, digest_len);
}

int sig_digest_sign(void* vctx, unsigned char* sig, size_t* siglen, size_t sigsize,
                    const unsigned char* tbs, size_t tbslen) {
  auto* ctx = ctx_of(vctx);
  if (sig == nullptr) return signature_size(ctx, siglen);
  if (ctx->kind == KeyKind::kEd25519) return sign_input(ctx, sig, siglen, sigsize, tbs, tbslen);
  return sig_digest_sign_update(ctx, tbs, tbslen) == 1 &&
                 sig_digest_sign_final(ctx, sig, siglen, sigsize) == 1
             ? 1
             : 0;
}

int sig_digest_verify_update(void* vctx, const unsigned char* data, size_t datalen) {
  return EVP_DigestVerifyUpdate(ctx_of(vctx)->shadow_md.get(), data, datalen);
}
int sig_digest_verify_final(void* vctx, const unsigned char* sig, size_t siglen) {
  return EVP_DigestVerifyFinal(ctx_of(vctx)->shadow_md.get(), sig, siglen) == 1 ? 1 : 0;
}
int sig_digest_verify(void* vctx, const unsigned char* sig, size_t siglen, const unsigned char* tbs,
                      size_t tbslen) {
  return EVP_DigestVerify(ctx_of(vctx)->shadow_md.get(), sig, siglen, tbs, tbslen) == 1 ? 1 : 0;
}

/// An integer parameter given as a number or as one of `names` (OpenSSL sends both forms).
bool int_or_name(const OSSL_PARAM& p, std::initializer_list<std::pair<const char*, int>> names,
                 int& out) {
  if (p.data_type == OSSL_PARAM_UTF8_STRING) {
    const auto* text = static_cast<const char*>(p.data);
    for (const auto& [name, value] : names) {
      if (std::strcmp(text, name) == 0) {
        out = value;
        return true;
      }
    }
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (end == text || *end != '\0') return false;
    out = static_cast<int>(value);
    return true;
  }
  return OSSL_PARAM_get_int(&p, &out) == 1;
}

int sig_set_ctx_params(void* vctx, const OSSL_PARAM params[]) {
  auto* ctx = ctx_of(vctx);
  if (params == nullptr) return 1;
  if (const auto* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) {
    const char* name = nullptr;
    if (OSSL_PARAM_get_utf8_string_ptr(p, &name) != 1) return 0;
    ctx->md.reset(EVP_MD_fetch(ctx->provider->libctx(), name, nullptr));
    if (!ctx->md) {
      ctx->provider->raise(kReasonNotSupported, "unknown digest %s", name);
      return 0;
    }
  }
  if (const auto* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) {
    if (!int_or_name(*p,
                     {{OSSL_PKEY_RSA_PAD_MODE_NONE, RSA_NO_PADDING},
                      {OSSL_PKEY_RSA_PAD_MODE_PKCSV15, RSA_PKCS1_PADDING},
                      {OSSL_PKEY_RSA_PAD_MODE_X931, RSA_X931_PADDING},
                      {OSSL_PKEY_RSA_PAD_MODE_PSS, RSA_PKCS1_PSS_PADDING}},
                     ctx->padding)) {
      return 0;
    }
  }
  if (const auto* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) {
    if (!int_or_name(*p,
                     {{OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST, RSA_PSS_SALTLEN_DIGEST},
                      {OSSL_PKEY_RSA_PSS_SALT_LEN_MAX, RSA_PSS_SALTLEN_MAX},
                      {OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO, RSA_PSS_SALTLEN_AUTO}},
                     ctx->saltlen)) {
      return 0;
    }
  }
  if (const auto* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) {
    const char* name = nullptr;
    if (OSSL_PARAM_get_utf8_string_ptr(p, &name) != 1) return 0;
    ctx->mgf1 = name;
  }
  // The shadow context gets the same settings (and checks them as the default provider does).
  EVP_PKEY_CTX* shadow = ctx->shadow_pkey_ctx();
  return shadow == nullptr || EVP_PKEY_CTX_set_params(shadow, params) == 1 ? 1 : 0;
}

int sig_get_ctx_params(void* vctx, OSSL_PARAM params[]) {
  EVP_PKEY_CTX* shadow = ctx_of(vctx)->shadow_pkey_ctx();
  return shadow != nullptr && EVP_PKEY_CTX_get_params(shadow, params) == 1 ? 1 : 0;
}

const OSSL_PARAM* sig_gettable_ctx_params(void* /*ctx*/, void* /*provctx*/) {
  static const OSSL_PARAM kGettable[] = {
      OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, nullptr, 0), OSSL_PARAM_END};
  return kGettable;
}

template <KeyKind K>
const OSSL_PARAM* sig_settable_ctx_params(void* /*ctx*/, void* /*provctx*/) {
  static const OSSL_PARAM kRsa[] = {
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, nullptr, 0),
      OSSL_PARAM_END};
  static const OSSL_PARAM kOther[] = {
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, nullptr, 0), OSSL_PARAM_END};
  if constexpr (K == KeyKind::kRsa) return kRsa;
  return kOther;
}

}  // namespace

#define HSM_SIGNATURE_TABLE(K)                                                          \
  {                                                                                     \
    {OSSL_FUNC_SIGNATURE_NEWCTX, HSM_FN(&sig_newctx<K>)},                               \
        {OSSL_FUNC_SIGNATURE_FREECTX, HSM_FN(&sig_freectx)},                            \
        {OSSL_FUNC_SIGNATURE_DUPCTX, HSM_FN(&sig_dupctx)},                              \
        {OSSL_FUNC_SIGNATURE_SIGN_INIT, HSM_FN(&sig_sign_init)},                        \
        {OSSL_FUNC_SIGNATURE_SIGN, HSM_FN(&sig_sign)},                                  \
        {OSSL_FUNC_SIGNATURE_VERIFY_INIT, HSM_FN(&sig_verify_init)},                    \
        {OSSL_FUNC_SIGNATURE_VERIFY, HSM_FN(&sig_verify)},                              \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, HSM_FN(&sig_digest_sign_init)},          \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, HSM_FN(&sig_digest_sign_update)},      \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, HSM_FN(&sig_digest_sign_final)},        \
        {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, HSM_FN(&sig_digest_sign)},                    \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT, HSM_FN(&sig_digest_verify_init)},      \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE, HSM_FN(&sig_digest_verify_update)},  \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL, HSM_FN(&sig_digest_verify_final)},    \
        {OSSL_FUNC_SIGNATURE_DIGEST_VERIFY, HSM_FN(&sig_digest_verify)},                \
        {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, HSM_FN(&sig_get_ctx_params)},              \
        {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, HSM_FN(&sig_gettable_ctx_params)},    \
        {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, HSM_FN(&sig_set_ctx_params)},              \
        {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, HSM_FN(&sig_settable_ctx_params<K>)}, \
        {0, nullptr},                                                                   \
  }

const OSSL_DISPATCH kEcdsaSignature[] = HSM_SIGNATURE_TABLE(KeyKind::kEc);
const OSSL_DISPATCH kRsaSignature[] = HSM_SIGNATURE_TABLE(KeyKind::kRsa);
const OSSL_DISPATCH kEd25519Signature[] = HSM_SIGNATURE_TABLE(KeyKind::kEd25519);

}  // namespace hsm::provider
