// The algorithm table: one row per JOSE signing algorithm (RFC 7518, RFC 8037, RFC 8812) and one
// row per curve. Everything that differs between algorithms (key type, curve, hash, sizes,
// PKCS#11 mechanisms, JWK fields) is read from these rows; no code path switches on an alg name.
#pragma once

#include <openssl/types.h>
#include <p11-kit/pkcs11.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "hsm/protocol/types.hpp"

namespace hsm::agent::keys {

enum class KeyType : std::uint8_t { kEc, kEdwards, kRsa };
enum class SignScheme : std::uint8_t { kEcdsa, kEddsa, kRsaPkcs1, kRsaPss };
enum class Hash : std::uint8_t { kNone, kSha256, kSha384, kSha512 };

struct Curve {
  std::string_view jwk_crv;  // "P-256": the JWK crv value
  std::string_view group;    // "prime256v1": OpenSSL's group name (OSSL_PKEY_PARAM_GROUP_NAME)
  int nid;                   // OpenSSL NID of the curve's OID (CKA_EC_PARAMS)
  std::size_t field_bytes;   // bytes of a coordinate / of r and s; 32 for Ed25519's point
  CK_ULONG bits;             // key size as C_GetMechanismInfo reports it
  KeyType key_type;          // kEc or kEdwards
};

struct Algorithm {
  std::string_view name;  // "ES256"
  KeyType key_type;
  SignScheme scheme;
  const Curve* curve;           // EC and Edwards algs; nullptr for RSA
  Hash hash;                    // kNone for EdDSA (pure: the whole message is signed)
  std::size_t digest_bytes;     // 0 for EdDSA
  std::size_t signature_bytes;  // fixed size; 0 for RSA (the modulus length)
  CK_KEY_TYPE ckk;              // CKK_EC, CKK_EC_EDWARDS, CKK_RSA
  CK_MECHANISM_TYPE keygen_mechanism;
  CK_MECHANISM_TYPE digest_mechanism;    // signs a digest computed by the agent (EdDSA: message)
  CK_MECHANISM_TYPE combined_mechanism;  // hashes and signs in the token; kNoMechanism if none
  CK_MECHANISM_TYPE pss_hash;            // RSA-PSS: CK_RSA_PKCS_PSS_PARAMS.hashAlg
  CK_RSA_PKCS_MGF_TYPE pss_mgf;          // RSA-PSS: MGF1 with the same hash
};

inline constexpr CK_MECHANISM_TYPE kNoMechanism = CK_UNAVAILABLE_INFORMATION;
inline constexpr std::string_view kDefaultAlgorithm = "ES256";
inline constexpr std::string_view kDefaultRsaAlgorithm = "RS256";
inline constexpr std::uint32_t kDefaultRsaBits = 2048;

[[nodiscard]] std::span<const Curve> all_curves() noexcept;
[[nodiscard]] std::span<const Algorithm> all_algorithms() noexcept;

/// The row for a JOSE name ("ES256"), nullptr when unknown.
[[nodiscard]] const Algorithm* find_algorithm(std::string_view name) noexcept;
/// The curve with OpenSSL NID `nid`, nullptr when the agent does not support it.
[[nodiscard]] const Curve* find_curve_by_nid(int nid) noexcept;
/// The one algorithm of an EC or Edwards curve (ES256 for P-256, EdDSA for Ed25519).
[[nodiscard]] const Algorithm* algorithm_for_curve(const Curve& curve) noexcept;

/// The digest used by `hash`, fetched from OpenSSL once per process and never freed before exit.
/// nullptr for Hash::kNone.
[[nodiscard]] const EVP_MD* evp_md(Hash hash);

/// The DER DigestInfo prefix (RFC 8017 9.2) for `hash`, built by OpenSSL once: for RSA PKCS#1
/// v1.5 with CKM_RSA_PKCS, the token signs prefix || digest.
[[nodiscard]] std::span<const std::uint8_t> digest_info_prefix(Hash hash);

/// Hashes `data` with `hash` into `out` (at least EVP_MAX_MD_SIZE bytes); returns the digest
/// length. Uses a per-thread EVP_MD_CTX and the cached EVP_MD: no allocation per call.
[[nodiscard]] std::size_t compute_digest(Hash hash, std::span<const std::uint8_t> data,
                                         std::span<std::uint8_t> out);

/// The mechanisms a key generated for `alg` is restricted to (its CKA_ALLOWED_MECHANISMS, which
/// records the alg on the token): the one that signs an agent-computed digest, and the combined
/// hash-and-sign one when the alg has one, in that order. The token then refuses the key with
/// any other signature scheme; the hash (PS256 vs PS384 over CKM_RSA_PKCS_PSS) is not a
/// mechanism, so the agent enforces that part (KeyEntry::can_use).
[[nodiscard]] std::vector<CK_MECHANISM_TYPE> allowed_mechanisms(const Algorithm& alg);

/// DER of the curve's OID: the CKA_EC_PARAMS value the agent writes when generating a key.
[[nodiscard]] protocol::Bytes ec_params_der(const Curve& curve);

}  // namespace hsm::agent::keys
