// Key management for hsm keys (EC, RSA, Ed25519): keys come from the store loader (load) or
// from another provider's public key (import, so that EVP_PKEY_eq can compare a certificate's
// key with an hsm key). Parameters are answered by the public key held in the private libctx.
// The private half never leaves the HSM: export of private parts fails, and import refuses
// private parts (so OpenSSL falls back to the provider that holds them).
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <cstring>
#include <new>

#include "dispatch.hpp"
#include "key.hpp"

namespace hsm::provider {
namespace {

KeyData* key_data(void* keydata) {
  return static_cast<KeyData*>(keydata);
}

template <KeyKind K>
void* keymgmt_new(void* provctx) {
  return new (std::nothrow) KeyData{static_cast<ProviderContext*>(provctx), K, nullptr};
}

void keymgmt_free(void* keydata) {
  delete key_data(keydata);
}

template <KeyKind K>
void* keymgmt_load(const void* reference, size_t reference_size) {
  if (reference == nullptr || reference_size != sizeof(KeyReference)) return nullptr;
  const auto* ref = static_cast<const KeyReference*>(reference);
  if (ref->magic != KeyReference::kMagic || !ref->key || ref->key->kind != K) return nullptr;
  return new (std::nothrow) KeyData{ref->provider, K, ref->key};
}

void* keymgmt_dup(const void* keydata, int /*selection*/) {
  return new (std::nothrow) KeyData(*static_cast<const KeyData*>(keydata));
}

int keymgmt_get_params(void* keydata, OSSL_PARAM params[]) {
  const auto* data = key_data(keydata);
  if (!data->key || !data->key->pub) return 0;
  if (EVP_PKEY_get_params(data->key->pub.get(), params) == 0) return 0;
  // The default digest is the one of the key's alg (SHA-384 for an ES384 key, where the
  // default provider would say SHA-256 for every curve), so `openssl req` and friends pick the
  // hash the agent signs with.
  if (auto* p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_DEFAULT_DIGEST); p != nullptr) {
    if (const char* hash = hash_of_alg(data->key->alg); hash != nullptr) {
      if (OSSL_PARAM_set_utf8_string(p, hash) == 0) return 0;
    }
  }
  return 1;
}

const OSSL_PARAM* keymgmt_gettable_params(void* /*provctx*/) {
  static const OSSL_PARAM kGettable[] = {
      OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
      OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
      OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MANDATORY_DIGEST, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, nullptr, 0),
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0),
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
      OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, nullptr, 0),
      OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, nullptr, 0),
      OSSL_PARAM_END};
  return kGettable;
}

int keymgmt_has(const void* keydata, int selection) {
  const auto* data = static_cast<const KeyData*>(keydata);
  if (!data->key) return selection == 0 ? 1 : 0;
  // The private half is in the HSM: an hsm key "has" it (it can sign), an imported one not.
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 && !data->key->can_sign()) return 0;
  return 1;
}

int keymgmt_match(const void* keydata1, const void* keydata2, int selection) {
  const auto* a = static_cast<const KeyData*>(keydata1);
  const auto* b = static_cast<const KeyData*>(keydata2);
  if (!a->key || !b->key) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0) {
    return EVP_PKEY_parameters_eq(a->key->pub.get(), b->key->pub.get()) == 1 ? 1 : 0;
  }
  return EVP_PKEY_eq(a->key->pub.get(), b->key->pub.get()) == 1 ? 1 : 0;
}

int keymgmt_import(void* keydata, int selection, const OSSL_PARAM params[]) {
  auto* data = key_data(keydata);
  // Never hold private key material: refusing lets OpenSSL use the key where it lives.
  for (const char* secret : {OSSL_PKEY_PARAM_PRIV_KEY, OSSL_PKEY_PARAM_RSA_D}) {
    if (OSSL_PARAM_locate_const(params, secret) != nullptr) return 0;
  }
  const int wanted = (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0 ? EVP_PKEY_PUBLIC_KEY
                                                                       : EVP_PKEY_KEY_PARAMETERS;
  EvpPkeyCtxPtr ctx(
      EVP_PKEY_CTX_new_from_name(data->provider->libctx(), info(data->kind).type, nullptr));
  EVP_PKEY* pub = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) <= 0 ||
      EVP_PKEY_fromdata(ctx.get(), &pub, wanted, const_cast<OSSL_PARAM*>(params)) <= 0) {
    return 0;
  }
  data->key = std::make_shared<const HsmKey>(HsmKey{data->kind, {}, {}, {}, EvpPkeyPtr(pub)});
  return 1;
}

int keymgmt_export(void* keydata, int selection, OSSL_CALLBACK* callback, void* callback_arg) {
  const auto* data = key_data(keydata);
  // Silently: OpenSSL tries an export to another provider before it uses this provider's
  // signature, and goes on when it fails; an error here would linger in the queue.
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 || !data->key) return 0;
  OSSL_PARAM* params = nullptr;
  if (EVP_PKEY_todata(data->key->pub.get(), EVP_PKEY_PUBLIC_KEY, &params) <= 0) return 0;
  const int ok = callback(params, callback_arg);
  OSSL_PARAM_free(params);
  return ok;
}

template <KeyKind K>
const OSSL_PARAM* keymgmt_key_types(int /*selection*/) {
  static const OSSL_PARAM kEc[] = {
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, nullptr, 0),
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0), OSSL_PARAM_END};
  static const OSSL_PARAM kRsa[] = {OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, nullptr, 0),
                                    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, nullptr, 0),
                                    OSSL_PARAM_END};
  static const OSSL_PARAM kEd25519[] = {
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0), OSSL_PARAM_END};
  if constexpr (K == KeyKind::kEc) return kEc;
  if constexpr (K == KeyKind::kRsa) return kRsa;
  return kEd25519;
}

template <KeyKind K>
const char* keymgmt_query_operation_name(int operation_id) {
  return operation_id == OSSL_OP_SIGNATURE ? info(K).signature : nullptr;
}

}  // namespace

// One table per key kind, the same functions instantiated for each.
#define HSM_KEYMGMT_TABLE(K)                                                                \
  {                                                                                         \
    {OSSL_FUNC_KEYMGMT_NEW, HSM_FN(&keymgmt_new<K>)},                                       \
        {OSSL_FUNC_KEYMGMT_FREE, HSM_FN(&keymgmt_free)},                                    \
        {OSSL_FUNC_KEYMGMT_LOAD, HSM_FN(&keymgmt_load<K>)},                                 \
        {OSSL_FUNC_KEYMGMT_DUP, HSM_FN(&keymgmt_dup)},                                      \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, HSM_FN(&keymgmt_get_params)},                        \
        {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, HSM_FN(&keymgmt_gettable_params)},              \
        {OSSL_FUNC_KEYMGMT_HAS, HSM_FN(&keymgmt_has)},                                      \
        {OSSL_FUNC_KEYMGMT_MATCH, HSM_FN(&keymgmt_match)},                                  \
        {OSSL_FUNC_KEYMGMT_IMPORT, HSM_FN(&keymgmt_import)},                                \
        {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, HSM_FN(&keymgmt_key_types<K>)},                    \
        {OSSL_FUNC_KEYMGMT_EXPORT, HSM_FN(&keymgmt_export)},                                \
        {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, HSM_FN(&keymgmt_key_types<K>)},                    \
        {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, HSM_FN(&keymgmt_query_operation_name<K>)}, \
        {0, nullptr},                                                                       \
  }

const OSSL_DISPATCH kEcKeymgmt[] = HSM_KEYMGMT_TABLE(KeyKind::kEc);
const OSSL_DISPATCH kRsaKeymgmt[] = HSM_KEYMGMT_TABLE(KeyKind::kRsa);
const OSSL_DISPATCH kEd25519Keymgmt[] = HSM_KEYMGMT_TABLE(KeyKind::kEd25519);

}  // namespace hsm::provider
