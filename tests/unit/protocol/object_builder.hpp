// Builds msgpack::object trees by hand for tests, including shapes the encoder never produces
// (wrong types, duplicate keys, non-str keys). Everything lives in the builder's zone.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <msgpack.hpp>
#include <span>
#include <string_view>
#include <utility>

#include "hsm/protocol/types.hpp"

namespace hsm::protocol::test {

class ObjectBuilder {
 public:
  using Object = msgpack::object;

  Object nil() const { return Object{}; }
  Object boolean(bool value) const { return Object(value); }
  Object uint(std::uint64_t value) const { return Object(value); }
  Object sint(std::int64_t value) const { return Object(value); }
  Object float64(double value) const { return Object(value); }

  Object str(std::string_view text) {
    Object o;
    o.type = msgpack::type::STR;
    o.via.str.size = static_cast<std::uint32_t>(text.size());
    o.via.str.ptr = copy(text);
    return o;
  }

  Object bin(std::string_view bytes) {
    Object o;
    o.type = msgpack::type::BIN;
    o.via.bin.size = static_cast<std::uint32_t>(bytes.size());
    o.via.bin.ptr = copy(bytes);
    return o;
  }

  Object bin(const Bytes& bytes) {
    return bin(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  }

  Object array(std::initializer_list<Object> items) {
    return array(std::span<const Object>(items.begin(), items.size()));
  }

  Object array(std::span<const Object> items) {
    Object o;
    o.type = msgpack::type::ARRAY;
    o.via.array.size = static_cast<std::uint32_t>(items.size());
    auto* ptr = static_cast<Object*>(
        zone_.allocate_align(sizeof(Object) * (items.size() + 1), MSGPACK_ZONE_ALIGNOF(Object)));
    std::size_t i = 0;
    for (const Object& item : items) {
      ptr[i++] = item;
    }
    o.via.array.ptr = ptr;
    return o;
  }

  /// A map with arbitrary keys (duplicates and non-str keys allowed).
  Object map(std::initializer_list<std::pair<Object, Object>> entries) {
    Object o;
    o.type = msgpack::type::MAP;
    o.via.map.size = static_cast<std::uint32_t>(entries.size());
    auto* ptr = static_cast<msgpack::object_kv*>(
        zone_.allocate_align(sizeof(msgpack::object_kv) * (entries.size() + 1),
                             MSGPACK_ZONE_ALIGNOF(msgpack::object_kv)));
    std::size_t i = 0;
    for (const auto& [key, value] : entries) {
      ptr[i].key = key;
      ptr[i].val = value;
      ++i;
    }
    o.via.map.ptr = ptr;
    return o;
  }

  /// A map with str keys.
  Object params(std::initializer_list<std::pair<std::string_view, Object>> entries) {
    Object o;
    o.type = msgpack::type::MAP;
    o.via.map.size = static_cast<std::uint32_t>(entries.size());
    auto* ptr = static_cast<msgpack::object_kv*>(
        zone_.allocate_align(sizeof(msgpack::object_kv) * (entries.size() + 1),
                             MSGPACK_ZONE_ALIGNOF(msgpack::object_kv)));
    std::size_t i = 0;
    for (const auto& [key, value] : entries) {
      ptr[i].key = str(key);
      ptr[i].val = value;
      ++i;
    }
    o.via.map.ptr = ptr;
    return o;
  }

  /// [0, msgid, method, [params]]
  Object request(std::uint32_t msgid, std::string_view method, Object params_map) {
    return array({uint(0), uint(msgid), str(method), array({params_map})});
  }

  /// [1, msgid, error, result]
  Object response(std::uint32_t msgid, Object error, Object result) {
    return array({uint(1), uint(msgid), error, result});
  }

 private:
  const char* copy(std::string_view bytes) {
    auto* p = static_cast<char*>(zone_.allocate_no_align(bytes.size() + 1));
    if (!bytes.empty()) {
      std::memcpy(p, bytes.data(), bytes.size());
    }
    return p;
  }

  msgpack::zone zone_;
};

/// Packs `obj` and unpacks it again, as the peer would see it.
inline msgpack::object_handle through_wire(const msgpack::object& obj) {
  msgpack::sbuffer buffer;
  msgpack::pack(buffer, obj);
  return msgpack::unpack(buffer.data(), buffer.size());
}

inline Bytes bytes_of(std::string_view text) {
  return Bytes(text.begin(), text.end());
}

}  // namespace hsm::protocol::test
