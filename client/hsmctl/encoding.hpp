// Byte encodings hsmctl reads and prints (hex, base64url, PEM) and bounded file I/O. Built on
// OpenSSL's encoders. Bad input throws UsageError with a message for the operator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::hsmctl {

/// Input the operator got wrong (bad hex, unreadable file...): exit code 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using Bytes = std::vector<std::uint8_t>;

/// Hex digits, optionally with ':' between byte pairs ("ab:cd"); case-insensitive.
[[nodiscard]] Bytes decode_hex(std::string_view hex);
/// RFC 4648 section 5, without padding (JOSE's encoding).
[[nodiscard]] std::string encode_base64url(std::span<const std::uint8_t> bytes);
/// base64url with or without '=' padding; surrounding whitespace is ignored.
[[nodiscard]] Bytes decode_base64url(std::string_view text);
/// A DER SubjectPublicKeyInfo as a PEM "PUBLIC KEY" block.
[[nodiscard]] std::string spki_to_pem(std::span<const std::uint8_t> spki_der);

/// The whole file ("-": standard input), refusing more than `max_bytes`.
[[nodiscard]] Bytes read_file(const std::string& path, std::size_t max_bytes);
void write_file(const std::string& path, std::span<const std::uint8_t> bytes);

}  // namespace hsm::hsmctl
