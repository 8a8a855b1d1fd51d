#include "keys/algorithm.hpp"

#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <array>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "hsm/common/openssl_ptr.hpp"

namespace hsm::agent::keys {
namespace {

constexpr std::array kCurves = {
    Curve{"P-256", "prime256v1", NID_X9_62_prime256v1, 32, 256, KeyType::kEc},
    Curve{"P-384", "secp384r1", NID_secp384r1, 48, 384, KeyType::kEc},
    Curve{"P-521", "secp521r1", NID_secp521r1, 66, 521, KeyType::kEc},
    Curve{"secp256k1", "secp256k1", NID_secp256k1, 32, 256, KeyType::kEc},
    Curve{"Ed25519", "ED25519", NID_ED25519, 32, 256, KeyType::kEdwards},
};

constexpr const Curve* kP256 = &kCurves[0];
constexpr const Curve* kP384 = &kCurves[1];
constexpr const Curve* kP521 = &kCurves[2];
constexpr const Curve* kSecp256k1 = &kCurves[3];
constexpr const Curve* kEd25519 = &kCurves[4];

constexpr Algorithm ecdsa(std::string_view name, const Curve* curve, Hash hash,
                          std::size_t digest_bytes, CK_MECHANISM_TYPE combined) {
  return Algorithm{name,
                   KeyType::kEc,
                   SignScheme::kEcdsa,
                   curve,
                   hash,
                   digest_bytes,
                   2 * curve->field_bytes,
                   CKK_EC,
                   CKM_EC_KEY_PAIR_GEN,
                   CKM_ECDSA,
                   combined,
                   kNoMechanism,
                   0};
}

constexpr Algorithm rsa_pkcs1(std::string_view name, Hash hash, std::size_t digest_bytes,
                              CK_MECHANISM_TYPE combined) {
  return Algorithm{
      name, KeyType::kRsa, SignScheme::kRsaPkcs1,     nullptr,      hash,     digest_bytes,
      0,    CKK_RSA,       CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS, combined, kNoMechanism,
      0};
}

constexpr Algorithm rsa_pss(std::string_view name, Hash hash, std::size_t digest_bytes,
                            CK_MECHANISM_TYPE combined, CK_MECHANISM_TYPE pss_hash,
                            CK_RSA_PKCS_MGF_TYPE mgf) {
  return Algorithm{
      name, KeyType::kRsa, SignScheme::kRsaPss,       nullptr,          hash,     digest_bytes,
      0,    CKK_RSA,       CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_PSS, combined, pss_hash,
      mgf};
}

const std::array kAlgorithms = {
    ecdsa("ES256", kP256, Hash::kSha256, 32, CKM_ECDSA_SHA256),
    ecdsa("ES384", kP384, Hash::kSha384, 48, CKM_ECDSA_SHA384),
    ecdsa("ES512", kP521, Hash::kSha512, 64, CKM_ECDSA_SHA512),
    ecdsa("ES256K", kSecp256k1, Hash::kSha256, 32, CKM_ECDSA_SHA256),
    rsa_pkcs1("RS256", Hash::kSha256, 32, CKM_SHA256_RSA_PKCS),
    rsa_pkcs1("RS384", Hash::kSha384, 48, CKM_SHA384_RSA_PKCS),
    rsa_pkcs1("RS512", Hash::kSha512, 64, CKM_SHA512_RSA_PKCS),
    rsa_pss("PS256", Hash::kSha256, 32, CKM_SHA256_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256),
    rsa_pss("PS384", Hash::kSha384, 48, CKM_SHA384_RSA_PKCS_PSS, CKM_SHA384, CKG_MGF1_SHA384),
    rsa_pss("PS512", Hash::kSha512, 64, CKM_SHA512_RSA_PKCS_PSS, CKM_SHA512, CKG_MGF1_SHA512),
    Algorithm{"EdDSA", KeyType::kEdwards, SignScheme::kEddsa, kEd25519, Hash::kNone, 0, 64,
              CKK_EC_EDWARDS, CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA, kNoMechanism, kNoMechanism,
              0},
};

struct HashRow {
  Hash hash;
  const char* openssl_name;
  int nid;
};
constexpr std::array kHashes = {
    HashRow{Hash::kSha256, "SHA256", NID_sha256},
    HashRow{Hash::kSha384, "SHA384", NID_sha384},
    HashRow{Hash::kSha512, "SHA512", NID_sha512},
};

const HashRow& hash_row(Hash hash) {
  for (const auto& row : kHashes) {
    if (row.hash == hash) return row;
  }
  throw std::logic_error("no digest for Hash::kNone");
}

// Process-wide, built once: fetched digests (an implicit fetch per use costs a lock and a
// lookup in OpenSSL 3) and DigestInfo prefixes.
struct HashCache {
  std::array<common::EvpMdPtr, kHashes.size()> mds;
  std::array<std::vector<std::uint8_t>, kHashes.size()> prefixes;

  HashCache() {
    for (std::size_t i = 0; i < kHashes.size(); ++i) {
      mds[i].reset(EVP_MD_fetch(nullptr, kHashes[i].openssl_name, nullptr));
      if (!mds[i])
        throw std::runtime_error("OpenSSL has no digest " + std::string{kHashes[i].openssl_name});
      prefixes[i] =
          build_prefix(kHashes[i].nid, static_cast<std::size_t>(EVP_MD_get_size(mds[i].get())));
    }
  }

  // DigestInfo ::= SEQUENCE { AlgorithmIdentifier {hash OID, NULL}, OCTET STRING digest }:
  // encode one around a zero digest with OpenSSL and keep everything before the digest.
  static std::vector<std::uint8_t> build_prefix(int nid, std::size_t digest_bytes) {
    common::OpenSslPtr<X509_SIG, X509_SIG_free> sig(X509_SIG_new());
    if (!sig) throw std::bad_alloc();
    X509_ALGOR* algor = nullptr;
    ASN1_OCTET_STRING* digest = nullptr;
    X509_SIG_getm(sig.get(), &algor, &digest);
    if (X509_ALGOR_set0(algor, OBJ_nid2obj(nid), V_ASN1_NULL, nullptr) != 1) {
      throw std::runtime_error("X509_ALGOR_set0 failed");
    }
    const std::vector<unsigned char> zeros(digest_bytes, 0);
    if (ASN1_OCTET_STRING_set(digest, zeros.data(), static_cast<int>(zeros.size())) != 1) {
      throw std::runtime_error("ASN1_OCTET_STRING_set failed");
    }
    unsigned char* der = nullptr;
    const int length = i2d_X509_SIG(sig.get(), &der);
    if (length <= 0) throw std::runtime_error("i2d_X509_SIG failed");
    std::vector<std::uint8_t> prefix(der, der + (static_cast<std::size_t>(length) - digest_bytes));
    OPENSSL_free(der);
    return prefix;
  }
};

const HashCache& hash_cache() {
  static const HashCache cache;  // thread-safe initialisation
  return cache;
}

std::size_t hash_index(Hash hash) {
  return static_cast<std::size_t>(&hash_row(hash) - kHashes.data());
}

}  // namespace

std::span<const Curve> all_curves() noexcept {
  return kCurves;
}
std::span<const Algorithm> all_algorithms() noexcept {
  return kAlgorithms;
}

const Algorithm* find_algorithm(std::string_view name) noexcept {
  for (const auto& alg : kAlgorithms) {
    if (alg.name == name) return &alg;
  }
  return nullptr;
}

const Curve* find_curve_by_nid(int nid) noexcept {
  for (const auto& curve : kCurves) {
    if (curve.nid == nid) return &curve;
  }
  return nullptr;
}

const Algorithm* algorithm_for_curve(const Curve& curve) noexcept {
  for (const auto& alg : kAlgorithms) {
    if (alg.curve == &curve) return &alg;
  }
  return nullptr;
}

const EVP_MD* evp_md(Hash hash) {
  if (hash == Hash::kNone) return nullptr;
  return hash_cache().mds[hash_index(hash)].get();
}

std::span<const std::uint8_t> digest_info_prefix(Hash hash) {
  return hash_cache().prefixes[hash_index(hash)];
}

std::size_t compute_digest(Hash hash, std::span<const std::uint8_t> data,
                           std::span<std::uint8_t> out) {
  const EVP_MD* md = evp_md(hash);
  if (md == nullptr || out.size() < static_cast<std::size_t>(EVP_MD_get_size(md))) {
    throw std::logic_error("compute_digest: no digest or output too small");
  }
  // One context per worker thread, reset by each EVP_DigestInit_ex2.
  thread_local const common::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  unsigned int length = 0;
  if (!ctx || EVP_DigestInit_ex2(ctx.get(), md, nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), out.data(), &length) != 1) {
    throw std::runtime_error("OpenSSL digest failed");
  }
  return length;
}

std::vector<CK_MECHANISM_TYPE> allowed_mechanisms(const Algorithm& alg) {
  std::vector<CK_MECHANISM_TYPE> mechanisms{alg.digest_mechanism};
  if (alg.combined_mechanism != kNoMechanism) mechanisms.push_back(alg.combined_mechanism);
  return mechanisms;
}

protocol::Bytes ec_params_der(const Curve& curve) {
  const ASN1_OBJECT* oid = OBJ_nid2obj(curve.nid);
  const int length = i2d_ASN1_OBJECT(oid, nullptr);
  if (oid == nullptr || length <= 0) throw std::runtime_error("cannot encode the curve OID");
  protocol::Bytes der(static_cast<std::size_t>(length));
  unsigned char* out = der.data();
  (void)i2d_ASN1_OBJECT(oid, &out);
  return der;
}

}  // namespace hsm::agent::keys
