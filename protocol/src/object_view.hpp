// Small read-only helpers over msgpack::object shared by the two decoders. Private.
#pragma once

#include <cstddef>
#include <cstdint>
#include <msgpack.hpp>
#include <string>
#include <string_view>

namespace hsm::protocol::detail {

/// The MessagePack type of `obj` in words, for error messages ("str", "bin", "map"...).
[[nodiscard]] inline std::string_view type_name(const msgpack::object& obj) noexcept {
  switch (obj.type) {
    case msgpack::type::NIL:
      return "nil";
    case msgpack::type::BOOLEAN:
      return "bool";
    case msgpack::type::POSITIVE_INTEGER:
      return "uint";
    case msgpack::type::NEGATIVE_INTEGER:
      return "negative int";
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
      return "float";
    case msgpack::type::STR:
      return "str";
    case msgpack::type::BIN:
      return "bin";
    case msgpack::type::ARRAY:
      return "array";
    case msgpack::type::MAP:
      return "map";
    case msgpack::type::EXT:
      return "ext";
  }
  return "unknown";
}

/// The bytes of a str object, without copying. Precondition: obj.type == STR.
[[nodiscard]] inline std::string_view str_view(const msgpack::object& obj) noexcept {
  return {obj.via.str.ptr, obj.via.str.size};
}

/// A peer-supplied name made safe to put in an error message or a log line: at most 64 bytes,
/// printable ASCII kept, everything else replaced by '?'.
[[nodiscard]] inline std::string printable(std::string_view name) {
  constexpr std::size_t kMaxShown = 64;
  std::string shown;
  shown.reserve(name.size() < kMaxShown ? name.size() : kMaxShown + 3);
  for (std::size_t i = 0; i < name.size() && i < kMaxShown; ++i) {
    const char c = name[i];
    shown.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  if (name.size() > kMaxShown) {
    shown += "...";
  }
  return shown;
}

}  // namespace hsm::protocol::detail
