#include "hsm/common/base64url.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace hsm::common {
namespace {

constexpr std::string_view kAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int sextet(char c) noexcept {
  const auto at = kAlphabet.find(c);
  return at == std::string_view::npos ? -1 : static_cast<int>(at);
}

}  // namespace

std::string base64url_encode(std::span<const std::uint8_t> bytes) {
  if (bytes.empty()) return {};
  if (bytes.size() > static_cast<std::size_t>(std::numeric_limits<int>::max() / 4 * 3 - 3)) {
    throw std::length_error("too many bytes to encode");
  }
  // OpenSSL's base64, then the URL alphabet without padding.
  std::string text(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): OpenSSL takes unsigned char
  const int written = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(text.data()), bytes.data(),
                                      static_cast<int>(bytes.size()));
  text.resize(static_cast<std::size_t>(written));
  while (!text.empty() && text.back() == '=') text.pop_back();
  std::replace(text.begin(), text.end(), '+', '-');
  std::replace(text.begin(), text.end(), '/', '_');
  return text;
}

std::vector<std::uint8_t> base64url_decode(std::string_view text) {
  if (text.size() % 4 == 1) {
    throw std::invalid_argument("a base64url text cannot be 1 more than a multiple of 4 long");
  }
  std::vector<std::uint8_t> out;
  out.reserve(text.size() * 3 / 4);
  std::uint32_t buffer = 0;
  int bits = 0;
  for (const char c : text) {
    const int value = sextet(c);
    if (value < 0) {
      throw std::invalid_argument(
          "a character outside the base64url alphabet (padding '=' is not used in JOSE)");
    }
    buffer = (buffer << 6U) | static_cast<std::uint32_t>(value);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<std::uint8_t>((buffer >> static_cast<unsigned>(bits)) & 0xFFU));
    }
  }
  // Leftover bits must be zero, so that each byte string has exactly one encoding (otherwise a
  // signature could be altered in its last character and still verify).
  if (bits > 0 && (buffer & ((1U << static_cast<unsigned>(bits)) - 1U)) != 0) {
    throw std::invalid_argument("non-canonical base64url (trailing bits set)");
  }
  return out;
}

}  // namespace hsm::common
