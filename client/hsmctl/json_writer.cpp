#include "json_writer.hpp"

#include <array>
#include <charconv>
#include <cmath>
#include <stdexcept>

namespace hsm::hsmctl {
namespace {

constexpr std::string_view kReplacementCharacter = "\\ufffd";

/// Length of the valid UTF-8 sequence starting at text[i], or 0 when it is not one
/// (overlong forms, surrogates and code points above U+10FFFF are invalid).
std::size_t utf8_sequence_length(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  std::size_t length = 0;
  std::uint32_t code_point = 0;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
    code_point = lead & 0x1Fu;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    code_point = lead & 0x0Fu;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    code_point = lead & 0x07u;
  } else {
    return 0;
  }
  if (i + length > text.size()) {
    return 0;
  }
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xC0u) != 0x80u) {
      return 0;
    }
    code_point = (code_point << 6) | (byte(i + k) & 0x3Fu);
  }
  if (length == 3 && (code_point < 0x800 || (code_point >= 0xD800 && code_point <= 0xDFFF))) {
    return 0;
  }
  if (length == 4 && (code_point < 0x10000 || code_point > 0x10FFFF)) {
    return 0;
  }
  return length;
}

}  // namespace

std::string json_quote(std::string_view text) {
  std::string quoted;
  quoted.reserve(text.size() + 2);
  quoted.push_back('"');
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x80) {
      const std::size_t length = utf8_sequence_length(text, i);
      if (length == 0) {
        quoted += kReplacementCharacter;
        ++i;
      } else {
        quoted.append(text.substr(i, length));
        i += length;
      }
      continue;
    }
    switch (c) {
      case '"':
        quoted += "\\\"";
        break;
      case '\\':
        quoted += "\\\\";
        break;
      case '\b':
        quoted += "\\b";
        break;
      case '\f':
        quoted += "\\f";
        break;
      case '\n':
        quoted += "\\n";
        break;
      case '\r':
        quoted += "\\r";
        break;
      case '\t':
        quoted += "\\t";
        break;
      default:
        if (c < 0x20) {
          constexpr std::string_view kHex = "0123456789abcdef";
          quoted += "\\u00";
          quoted.push_back(kHex[c >> 4]);
          quoted.push_back(kHex[c & 0x0Fu]);
        } else {
          quoted.push_back(static_cast<char>(c));
        }
    }
    ++i;
  }
  quoted.push_back('"');
  return quoted;
}

void JsonWriter::raw(std::string_view text) {
  out_ << text;
}

void JsonWriter::before_value() {
  if (scopes_.empty()) {
    return;
  }
  switch (scopes_.back()) {
    case Scope::kObjectKey:
      throw std::logic_error("JsonWriter: a value where an object key is expected");
    case Scope::kObjectValue:
      scopes_.back() = Scope::kObjectKey;
      break;
    case Scope::kArray:
      if (!first_in_scope_) {
        raw(",");
      }
      first_in_scope_ = false;
      break;
  }
}

JsonWriter& JsonWriter::begin_object() {
  before_value();
  raw("{");
  scopes_.push_back(Scope::kObjectKey);
  first_in_scope_ = true;
  return *this;
}

JsonWriter& JsonWriter::end_object() {
  if (scopes_.empty() || scopes_.back() != Scope::kObjectKey) {
    throw std::logic_error("JsonWriter: end_object() outside an object or after a key");
  }
  scopes_.pop_back();
  first_in_scope_ = false;
  raw("}");
  return *this;
}

JsonWriter& JsonWriter::begin_array() {
  before_value();
  raw("[");
  scopes_.push_back(Scope::kArray);
  first_in_scope_ = true;
  return *this;
}

JsonWriter& JsonWriter::end_array() {
  if (scopes_.empty() || scopes_.back() != Scope::kArray) {
    throw std::logic_error("JsonWriter: end_array() outside an array");
  }
  scopes_.pop_back();
  first_in_scope_ = false;
  raw("]");
  return *this;
}

JsonWriter& JsonWriter::key(std::string_view name) {
  if (scopes_.empty() || scopes_.back() != Scope::kObjectKey) {
    throw std::logic_error("JsonWriter: a key outside an object");
  }
  if (!first_in_scope_) {
    raw(",");
  }
  first_in_scope_ = false;
  raw(json_quote(name));
  raw(":");
  scopes_.back() = Scope::kObjectValue;
  return *this;
}

JsonWriter& JsonWriter::string(std::string_view text) {
  before_value();
  raw(json_quote(text));
  return *this;
}

JsonWriter& JsonWriter::optional_string(const std::optional<std::string>& text) {
  return text ? string(*text) : null();
}

JsonWriter& JsonWriter::boolean(bool value) {
  before_value();
  raw(value ? "true" : "false");
  return *this;
}

JsonWriter& JsonWriter::number(double value) {
  if (!std::isfinite(value)) {
    return null();
  }
  before_value();
  std::array<char, 64> buffer{};
  auto [end, error] = std::to_chars(buffer.data(), buffer.data() + buffer.size(), value);
  if (error != std::errc{}) {
    throw std::logic_error("JsonWriter: cannot format a number");
  }
  raw(std::string_view(buffer.data(), static_cast<std::size_t>(end - buffer.data())));
  return *this;
}

JsonWriter& JsonWriter::number(std::uint64_t value) {
  before_value();
  raw(std::to_string(value));
  return *this;
}

JsonWriter& JsonWriter::null() {
  before_value();
  raw("null");
  return *this;
}

JsonWriter& JsonWriter::string_map(const std::map<std::string, std::string>& map) {
  begin_object();
  for (const auto& [name, text] : map) {
    key(name).string(text);
  }
  return end_object();
}

}  // namespace hsm::hsmctl
