// A small streaming JSON writer for hsmctl --json: one compact document, always valid JSON
// (strings escaped, invalid UTF-8 replaced by U+FFFD, non-finite numbers written as null).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::hsmctl {

/// `text` as a JSON string literal, quotes included.
[[nodiscard]] std::string json_quote(std::string_view text);

/// Writes values in order; commas and colons are placed for the caller. Misuse (a value where a
/// key is expected, unbalanced end_*) is a programming error and throws std::logic_error.
class JsonWriter {
 public:
  explicit JsonWriter(std::ostream& out) : out_(out) {}

  JsonWriter& begin_object();
  JsonWriter& end_object();
  JsonWriter& begin_array();
  JsonWriter& end_array();
  JsonWriter& key(std::string_view name);

  JsonWriter& string(std::string_view text);
  JsonWriter& optional_string(const std::optional<std::string>& text);  // null when absent
  JsonWriter& boolean(bool value);
  JsonWriter& number(double value);
  JsonWriter& number(std::uint64_t value);
  JsonWriter& null();
  /// A map of str to str as an object (a JWK).
  JsonWriter& string_map(const std::map<std::string, std::string>& map);

 private:
  enum class Scope : std::uint8_t { kObjectKey, kObjectValue, kArray };
  void before_value();
  void raw(std::string_view text);

  std::ostream& out_;
  std::vector<Scope> scopes_;
  bool first_in_scope_ = true;
};

}  // namespace hsm::hsmctl
