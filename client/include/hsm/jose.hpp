// hsm::jose: offline verification of compact JWS / JWT (RFC 7515, 7519) with OpenSSL, against a
// public key given as a JWK or a JWKS (for example the agent's get_jwks answer, or a JWKS
// document fetched from an issuer). No agent round trip, no Client needed.
//
//   auto jwks = client.get_jwks();                        // once; cache it
//   hsm::jose::Verified v = hsm::jose::verify(token, jwks);  // throws hsm::jose::Error
//   use(v.payload_text());
//
// Signing lives on hsm::Client (sign_jws, sign_jwt), because the private key stays in the HSM.
//
// Algorithms: every alg the agent supports: ES256, ES384, ES512, ES256K (ECDSA, JOSE r||s),
// RS256/384/512 (PKCS#1 v1.5), PS256/384/512 (PSS, salt length = hash length), EdDSA (Ed25519).
// "none" and anything else are refused. The alg in the JWS header must fit the key: kty and
// crv of the JWK (an ES384 token against a P-256 key is refused, so is RS256 against an EC key),
// and the JWK's own "alg" when it has one.
//
// Thread-safety: the functions are pure (no shared state); call them from any thread.
// Blocking: none; CPU only (one signature verification).
// Errors: every failure throws hsm::jose::Error (an hsm::Error) whose reason() says which check
// failed; nothing is returned for an invalid token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/client.hpp"

namespace hsm::jose {

/// Why a JWS was refused. Each has an hsm::Error code (reason_code()).
enum class Reason : std::uint8_t {
  kMalformed,       // "jose_malformed": not three base64url segments, header not a JSON object,
                    // JWK/JWKS not valid JSON, a "crit" header this verifier cannot honour
  kTooLarge,        // "jose_too_large": longer than VerifyOptions::max_bytes (checked first)
  kUnsupportedAlg,  // "jose_unsupported_alg": "none", missing, or an alg not in the list above
  kAlgMismatch,     // "jose_alg_mismatch": the header's alg does not fit the key (kty, crv, alg)
  kKidMismatch,     // "jose_kid_mismatch": header kid differs from the JWK's, or no JWKS key has it
  kBadKey,          // "jose_bad_key": the JWK is incomplete or not a valid public key
  kBadSignature,    // "jose_bad_signature": the signature does not verify (or has the wrong size)
};

[[nodiscard]] std::string_view reason_code(Reason reason) noexcept;

class Error : public hsm::Error {
 public:
  Error(Reason reason, const std::string& message);
  [[nodiscard]] Reason reason() const noexcept { return reason_; }

 private:
  Reason reason_;
};

/// Largest compact JWS accepted by default: checked before anything is decoded.
inline constexpr std::size_t kDefaultMaxJwsBytes = std::size_t{256} * 1024;

struct VerifyOptions {
  std::size_t max_bytes = kDefaultMaxJwsBytes;
  /// When set, the header's alg must be this one (defence in depth for callers that know it).
  std::optional<std::string> expected_alg;
};

/// A JWS whose signature was verified: its decoded parts.
struct Verified {
  std::string header_json;  // the protected header as sent (JSON text)
  std::string alg;
  std::optional<std::string> kid;  // the header's kid, if any
  Bytes payload;
  [[nodiscard]] std::string payload_text() const { return {payload.begin(), payload.end()}; }
};

/// Verifies `compact` (header.payload.signature) against one public key. A header kid, when
/// present, must equal the JWK's kid when the JWK has one.
[[nodiscard]] Verified verify(std::string_view compact, const Jwk& jwk,
                              const VerifyOptions& options = {});
/// Against a JWKS: the key whose kid equals the header's kid; a header without kid is accepted
/// only when the set holds exactly one key.
[[nodiscard]] Verified verify(std::string_view compact, const std::vector<Jwk>& jwks,
                              const VerifyOptions& options = {});
/// The same with the JWK (an object) or JWKS ({"keys": [...]}) as JSON text; which one it is
/// is told by the presence of "keys".
[[nodiscard]] Verified verify_json(std::string_view compact, std::string_view jwk_or_jwks_json,
                                   const VerifyOptions& options = {});

/// Base64url without padding (RFC 7515 section 2), as used in every JOSE segment.
[[nodiscard]] std::string base64url_encode(std::span<const std::uint8_t> bytes);
/// Throws Error(kMalformed) on a character outside the alphabet, padding, or a bad length.
[[nodiscard]] Bytes base64url_decode(std::string_view text);

}  // namespace hsm::jose
