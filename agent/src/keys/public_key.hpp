// Public keys as the agent publishes them: an OpenSSL EVP_PKEY (for verify), the DER
// SubjectPublicKeyInfo and the JWK, all built by OpenSSL 3 (EVP_PKEY_fromdata, i2d_PUBKEY) from
// the public values the token holds (EC point, RSA modulus and exponent, Ed25519 point).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "hsm/common/openssl_ptr.hpp"
#include "hsm/protocol/types.hpp"
#include "keys/algorithm.hpp"

namespace hsm::agent::keys {

struct PublicKey {
  common::SharedPkey pkey;  // immutable after construction; safe for concurrent verify
  protocol::Bytes spki;     // DER SubjectPublicKeyInfo
  protocol::Jwk jwk;        // kty and the key's public fields (crv/x/y, n/e, crv/x); no kid/alg/use
};

/// Throws std::invalid_argument when the token's values do not form a valid key (a point not on
/// the curve, an empty modulus, ...).
[[nodiscard]] PublicKey make_ec_public_key(const Curve& curve, std::span<const std::uint8_t> point);
[[nodiscard]] PublicKey make_ed25519_public_key(std::span<const std::uint8_t> point);
[[nodiscard]] PublicKey make_rsa_public_key(std::span<const std::uint8_t> modulus,
                                            std::span<const std::uint8_t> exponent);

/// The published JWK: the key's fields plus kid, alg and use="sig".
[[nodiscard]] protocol::Jwk jwk_with(const PublicKey& key, std::string_view kid,
                                     std::string_view alg);

}  // namespace hsm::agent::keys
