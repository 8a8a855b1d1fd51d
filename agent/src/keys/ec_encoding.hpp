// The encodings tokens disagree on, absorbed in one place (issue 3):
// - CKA_EC_POINT: a DER OCTET STRING around the point (PKCS#11 2.40; short or long form length,
//   P-521's 133-byte point needs the long form 0x81) or the bare point (some vendors);
// - CKA_EC_PARAMS: a named curve OID, or for Ed25519 the PrintableString "edwards25519";
// - ECDSA signatures: raw r||s (PKCS#11), sometimes with the leading zeros of r or s dropped, or
//   DER ECDSA-Sig-Value (some vendors); JOSE wants r||s, each half left-padded to the curve size.
// Pure functions over bytes; DER is parsed and written by OpenSSL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "keys/algorithm.hpp"

namespace hsm::agent::keys {

using Bytes = std::vector<std::uint8_t>;

/// The bare point from a CKA_EC_POINT value for `curve`: an uncompressed (0x04 || x || y) or
/// compressed (0x02/0x03 || x) point for Weierstrass curves, the 32-byte point for Ed25519.
/// The raw and the DER-wrapped forms are told apart by length, which the curve fixes (a raw
/// point starting with 0x04 could otherwise read as an OCTET STRING header). nullopt when the
/// value is neither.
[[nodiscard]] std::optional<Bytes> unwrap_ec_point(std::span<const std::uint8_t> value,
                                                   const Curve& curve);

/// The curve named by a CKA_EC_PARAMS value: a DER OID, or a DER PrintableString
/// "edwards25519" (older Edwards-curve tokens). nullptr when unknown or malformed.
[[nodiscard]] const Curve* parse_ec_params(std::span<const std::uint8_t> value);

/// Brings an ECDSA signature as a token returned it to JOSE's raw r||s of exactly
/// 2 * field_bytes, in place: a DER ECDSA-Sig-Value is converted; an even-length r||s shorter
/// than expected has each half left-padded with zeros. Returns false when the bytes are
/// neither form (the caller reports a token error). Reuses `signature`'s capacity.
/// (The two ECDSA encodings themselves: hsm/common/ecdsa_signature.hpp.)
[[nodiscard]] bool normalize_ecdsa_signature(Bytes& signature, std::size_t field_bytes);

/// Upper bound of a DER ECDSA-Sig-Value for a curve: the C_Sign buffer size that fits a token
/// that answers in DER.
[[nodiscard]] constexpr std::size_t max_ecdsa_der_bytes(std::size_t field_bytes) noexcept {
  // SEQUENCE header (<= 3) + 2 INTEGERs of (tag, <= 2 length bytes, <= field_bytes + 1).
  return 3 + 2 * (3 + field_bytes + 1);
}

}  // namespace hsm::agent::keys
