// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. The one
// check behind the protocol's kid rule and the JSON text of logs and audit lines.
#pragma once

#include <cstddef>
#include <string_view>

namespace hsm::common {

/// Length (1 to 4) of the valid UTF-8 sequence starting at text[at], or 0 when the bytes there
/// are not one. `at` must be less than text.size().
[[nodiscard]] std::size_t utf8_sequence_length(std::string_view text, std::size_t at) noexcept;

/// True when all of `text` is valid UTF-8.
[[nodiscard]] bool is_valid_utf8(std::string_view text) noexcept;

}  // namespace hsm::common
