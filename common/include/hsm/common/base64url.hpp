// Base64url without padding (RFC 7515 section 2, appendix C): JWK members, JWS segments and the
// signatures hsmctl prints.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::common {

/// `bytes` in the URL-safe alphabet, no '=' padding. Throws std::length_error beyond what
/// OpenSSL's encoder takes in one call (about 1.5 GiB).
[[nodiscard]] std::string base64url_encode(std::span<const std::uint8_t> bytes);

/// The bytes `text` encodes. Strict, so that each byte string has exactly one text: no padding,
/// no whitespace, no character outside the alphabet, unused trailing bits zero. Throws
/// std::invalid_argument saying which rule `text` breaks.
[[nodiscard]] std::vector<std::uint8_t> base64url_decode(std::string_view text);

}  // namespace hsm::common
