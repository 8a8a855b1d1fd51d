// The JOSE algorithm table shared by signing (header building) and offline verification: one
// row per alg the agent supports, with what a JWK must look like for it and how OpenSSL checks
// its signatures.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "hsm/client.hpp"

namespace hsm::jose::detail {

enum class Scheme : std::uint8_t { kEcdsa, kRsaPkcs1, kRsaPss, kEdDsa };

struct AlgSpec {
  std::string_view alg;
  Scheme scheme;
  const char* digest;       // OpenSSL digest name; nullptr for EdDSA (no pre-hash)
  std::string_view kty;     // the JWK's kty
  std::string_view crv;     // the JWK's crv ("" for RSA)
  const char* ossl_group;   // OpenSSL group name for EC keys, nullptr otherwise
  std::size_t field_bytes;  // ECDSA: bytes of one half of r||s (and of x, y)
};

/// The row for `alg`, or nullptr for "none" and anything unknown.
[[nodiscard]] const AlgSpec* find_alg(std::string_view alg) noexcept;

/// The protected header for sign_jws and the alg it names.
struct Header {
  std::string json;
  std::string alg;
  bool alg_from_caller = false;  // the caller's "alg", else the key's
};

/// Builds the protected header for sign_jws: `header_json` must be a JSON object of at most
/// `max_bytes`. "alg" (the caller's if given, which must be a supported alg, else `key_alg`) and
/// "kid" (which must equal `kid` if given) are put first; `defaults` are added when absent.
/// Throws jose::Error (kMalformed, kUnsupportedAlg, kKidMismatch, kTooLarge).
[[nodiscard]] Header make_header(std::string_view header_json, std::string_view key_alg,
                                 std::string_view kid, std::size_t max_bytes,
                                 std::string_view defaults_json = "{}");
/// `claims_json` as compact JSON; throws jose::Error(kMalformed) unless it is a JSON object.
[[nodiscard]] std::string compact_claims(std::string_view claims_json, std::size_t max_bytes);

}  // namespace hsm::jose::detail
