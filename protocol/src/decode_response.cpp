// Response decoding (the client side): the inverse of encode_response. Every shape the protocol
// promises is checked and a wrong one throws ProtocolError naming the field. Map keys this
// version does not know are ignored, so an agent may add result fields without breaking clients.
#include <array>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <utility>

#include "hsm/protocol/codec.hpp"
#include "object_view.hpp"
#include "wire_keys.hpp"

namespace hsm::protocol {
namespace {

using detail::printable;
using detail::str_view;
using detail::type_name;
using msgpack::object;

[[noreturn]] void bad(std::string_view context, std::string_view problem) {
  throw ProtocolError("malformed response: " + std::string(context) + ": " + std::string(problem));
}

std::string join(std::string_view context, std::string_view name) {
  return std::string(context) + "." + std::string(name);
}

std::string indexed(std::string_view context, std::size_t index) {
  return std::string(context) + "[" + std::to_string(index) + "]";
}

void expect_type(const object& obj, msgpack::type::object_type type, std::string_view context) {
  if (obj.type != type) {
    object expected;
    expected.type = type;
    bad(context,
        "must be " + std::string(type_name(expected)) + ", not " + std::string(type_name(obj)));
  }
}

std::string as_str(const object& obj, std::string_view context) {
  expect_type(obj, msgpack::type::STR, context);
  return std::string(str_view(obj));
}

Bytes as_bin(const object& obj, std::string_view context) {
  expect_type(obj, msgpack::type::BIN, context);
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(obj.via.bin.ptr);
  return Bytes(bytes, bytes + obj.via.bin.size);
}

bool as_bool(const object& obj, std::string_view context) {
  expect_type(obj, msgpack::type::BOOLEAN, context);
  return obj.via.boolean;
}

std::uint64_t as_uint(const object& obj, std::string_view context, std::uint64_t max) {
  expect_type(obj, msgpack::type::POSITIVE_INTEGER, context);
  if (obj.via.u64 > max) {
    bad(context, "out of range");
  }
  return obj.via.u64;
}

double as_number(const object& obj, std::string_view context) {
  switch (obj.type) {
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64:
      return obj.via.f64;
    case msgpack::type::POSITIVE_INTEGER:
      return static_cast<double>(obj.via.u64);
    case msgpack::type::NEGATIVE_INTEGER:
      return static_cast<double>(obj.via.i64);
    default:
      bad(context, "must be float, not " + std::string(type_name(obj)));
  }
}

std::span<const object> as_array(const object& obj, std::string_view context) {
  expect_type(obj, msgpack::type::ARRAY, context);
  return {obj.via.array.ptr, obj.via.array.size};
}

Jwk as_jwk(const object& obj, std::string_view context) {
  expect_type(obj, msgpack::type::MAP, context);
  Jwk jwk;
  for (const msgpack::object_kv& kv : std::span(obj.via.map.ptr, obj.via.map.size)) {
    if (kv.key.type != msgpack::type::STR) {
      bad(context, "keys must be str, not " + std::string(type_name(kv.key)));
    }
    const std::string_view name = str_view(kv.key);
    std::string value = as_str(kv.val, join(context, printable(name)));
    if (!jwk.emplace(name, std::move(value)).second) {
      bad(context, "'" + printable(name) + "' appears twice");
    }
  }
  return jwk;
}

/// The known fields of one map, looked up once; `names` must outlive the reader.
class MapReader {
 public:
  static constexpr std::size_t kMaxFields = 9;

  MapReader(const object& obj, std::string context, std::span<const std::string_view> names)
      : context_(std::move(context)), names_(names) {
    if (names_.size() > kMaxFields) {
      throw std::logic_error("MapReader: too many fields");
    }
    expect_type(obj, msgpack::type::MAP, context_);
    for (const msgpack::object_kv& kv : std::span(obj.via.map.ptr, obj.via.map.size)) {
      if (kv.key.type != msgpack::type::STR) {
        bad(context_, "keys must be str, not " + std::string(type_name(kv.key)));
      }
      const std::string_view name = str_view(kv.key);
      for (std::size_t i = 0; i < names_.size(); ++i) {
        if (names_[i] == name) {
          if (values_[i] != nullptr) {
            bad(context_, "'" + std::string(name) + "' appears twice");
          }
          values_[i] = &kv.val;
          break;
        }
      }
    }
  }

  [[nodiscard]] const object* find(std::size_t i) const { return values_[i]; }

  [[nodiscard]] const object& at(std::size_t i) const {
    if (values_[i] == nullptr) {
      bad(context_, "missing '" + std::string(names_[i]) + "'");
    }
    return *values_[i];
  }

  [[nodiscard]] std::string field(std::size_t i) const { return join(context_, names_[i]); }

  [[nodiscard]] std::string str(std::size_t i) const { return as_str(at(i), field(i)); }
  [[nodiscard]] Bytes bin(std::size_t i) const { return as_bin(at(i), field(i)); }
  [[nodiscard]] bool boolean(std::size_t i) const { return as_bool(at(i), field(i)); }
  [[nodiscard]] Jwk jwk(std::size_t i) const { return as_jwk(at(i), field(i)); }
  [[nodiscard]] std::uint64_t uint(std::size_t i, std::uint64_t max) const {
    return as_uint(at(i), field(i), max);
  }

 private:
  std::string context_;
  std::span<const std::string_view> names_;
  std::array<const object*, kMaxFields> values_{};
};

Error decode_error(const object& obj, std::string context) {
  static constexpr std::array<std::string_view, 3> kNames = {wire::kCode, wire::kMessage,
                                                             wire::kCkr};
  const MapReader map(obj, std::move(context), kNames);
  Error error;
  const std::string code = map.str(0);
  error.message = map.str(1);
  if (const std::optional<ErrorCode> parsed = parse_error_code(code)) {
    error.code = *parsed;
  } else {
    // A newer agent may add codes: keep the answer usable, as an internal error that says so.
    error.code = ErrorCode::kInternal;
    error.message = "unknown error code '" + printable(code) + "': " + error.message;
  }
  if (const object* ckr = map.find(2); ckr != nullptr && ckr->type != msgpack::type::NIL) {
    error.ckr = as_str(*ckr, map.field(2));
  }
  return error;
}

KeyDescription decode_key_description(const object& obj, std::string context) {
  static constexpr std::array<std::string_view, 3> kNames = {wire::kKid, wire::kAlg, wire::kJwk};
  const MapReader map(obj, std::move(context), kNames);
  return KeyDescription{map.str(0), map.str(1), map.jwk(2)};
}

// ---- One decoder per result type ---------------------------------------------------------------

CapabilitiesResult decode_capabilities(const object& obj) {
  static constexpr std::array<std::string_view, 9> kNames = {
      wire::kProtocol,   wire::kAgentVersion,    wire::kCanCreate,
      wire::kCanImport,  wire::kCanDelete,       wire::kSupportedAlgs,
      wire::kDefaultAlg, wire::kMaxMessageBytes, wire::kMetricsUrl};
  const MapReader map(obj, "result", kNames);
  CapabilitiesResult r;
  r.protocol = static_cast<std::uint32_t>(map.uint(0, std::numeric_limits<std::uint32_t>::max()));
  r.agent_version = map.str(1);
  r.can_create = map.boolean(2);
  r.can_import = map.boolean(3);
  r.can_delete = map.boolean(4);
  const std::string algs_context = map.field(5);
  const std::span<const object> algs = as_array(map.at(5), algs_context);
  r.supported_algs.reserve(algs.size());
  for (std::size_t i = 0; i < algs.size(); ++i) {
    r.supported_algs.push_back(as_str(algs[i], indexed(algs_context, i)));
  }
  r.default_alg = map.str(6);
  r.max_message_bytes = map.uint(7, std::numeric_limits<std::uint64_t>::max());
  // Optional: agents before it send no metrics_url; nil when the agent serves no metrics.
  if (const object* url = map.find(8); url != nullptr && url->type != msgpack::type::NIL) {
    r.metrics_url = as_str(*url, map.field(8));
  }
  return r;
}

HealthResult decode_health(const object& obj) {
  static constexpr std::array<std::string_view, 4> kNames = {wire::kOk, wire::kLatencyMs,
                                                             wire::kError, wire::kToken};
  static constexpr std::array<std::string_view, 4> kTokenNames = {wire::kLabel, wire::kManufacturer,
                                                                  wire::kModel, wire::kSerial};
  const MapReader map(obj, "result", kNames);
  HealthResult r;
  r.ok = map.boolean(0);
  r.latency_ms = as_number(map.at(1), map.field(1));
  if (const object& error = map.at(2); error.type != msgpack::type::NIL) {
    r.error = as_str(error, map.field(2));
  }
  const MapReader token(map.at(3), map.field(3), kTokenNames);
  r.token = TokenDescription{token.str(0), token.str(1), token.str(2), token.str(3)};
  return r;
}

SignResult decode_sign(const object& obj) {
  static constexpr std::array<std::string_view, 3> kNames = {wire::kKid, wire::kAlg,
                                                             wire::kSignature};
  const MapReader map(obj, "result", kNames);
  return SignResult{map.str(0), map.str(1), map.bin(2)};
}

VerifyResult decode_verify(const object& obj) {
  static constexpr std::array<std::string_view, 1> kNames = {wire::kValid};
  return VerifyResult{MapReader(obj, "result", kNames).boolean(0)};
}

PublicKeyResult decode_public_key(const object& obj) {
  static constexpr std::array<std::string_view, 4> kNames = {wire::kKid, wire::kAlg, wire::kJwk,
                                                             wire::kSpki};
  const MapReader map(obj, "result", kNames);
  return PublicKeyResult{map.str(0), map.str(1), map.jwk(2), map.bin(3)};
}

ListKeysResult decode_list_keys(const object& obj) {
  static constexpr std::array<std::string_view, 1> kNames = {wire::kKeys};
  const MapReader map(obj, "result", kNames);
  const std::string context = map.field(0);
  const std::span<const object> keys = as_array(map.at(0), context);
  ListKeysResult r;
  r.keys.reserve(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    r.keys.push_back(decode_key_description(keys[i], indexed(context, i)));
  }
  return r;
}

DeleteKeyResult decode_delete_key(const object& obj) {
  static constexpr std::array<std::string_view, 1> kNames = {wire::kDeleted};
  return DeleteKeyResult{MapReader(obj, "result", kNames).boolean(0)};
}

JwksResult decode_jwks(const object& obj) {
  static constexpr std::array<std::string_view, 1> kNames = {wire::kKeys};
  const MapReader map(obj, "result", kNames);
  const std::string context = map.field(0);
  const std::span<const object> keys = as_array(map.at(0), context);
  JwksResult r;
  r.keys.reserve(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    r.keys.push_back(as_jwk(keys[i], indexed(context, i)));
  }
  return r;
}

SignBatchResult decode_sign_batch(const object& obj) {
  static constexpr std::array<std::string_view, 1> kNames = {wire::kResults};
  static constexpr std::array<std::string_view, 2> kItemNames = {wire::kSignature, wire::kError};
  const MapReader map(obj, "result", kNames);
  const std::string context = map.field(0);
  const std::span<const object> items = as_array(map.at(0), context);
  SignBatchResult r;
  r.results.reserve(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const MapReader item(items[i], indexed(context, i), kItemNames);
    const object* signature = item.find(0);
    const object* error = item.find(1);
    if ((signature == nullptr) == (error == nullptr)) {
      bad(indexed(context, i), "must hold exactly one of 'signature' and 'error'");
    }
    if (signature != nullptr) {
      r.results.emplace_back(as_bin(*signature, item.field(0)));
    } else {
      r.results.emplace_back(decode_error(*error, item.field(1)));
    }
  }
  return r;
}

Result decode_result(const object& obj, Method method) {
  switch (method) {
    case Method::kCapabilities:
      return decode_capabilities(obj);
    case Method::kHealth:
      return decode_health(obj);
    case Method::kGenerateKey:
      return decode_key_description(obj, "result");
    case Method::kSign:
      return decode_sign(obj);
    case Method::kVerify:
      return decode_verify(obj);
    case Method::kGetPublicKey:
      return decode_public_key(obj);
    case Method::kListKeys:
      return decode_list_keys(obj);
    case Method::kDeleteKey:
      return decode_delete_key(obj);
    case Method::kGetJwks:
      return decode_jwks(obj);
    case Method::kSignBatch:
      return decode_sign_batch(obj);
    case Method::kImportKey:
      break;
  }
  bad("result", std::string(to_string(method)) + " has no result (only an error)");
}

}  // namespace

std::optional<std::uint32_t> response_msgid(const object& msg) noexcept {
  if (msg.type != msgpack::type::ARRAY || msg.via.array.size != 4) {
    return std::nullopt;
  }
  const object& tag = msg.via.array.ptr[0];
  const object& msgid = msg.via.array.ptr[1];
  if (tag.type != msgpack::type::POSITIVE_INTEGER || tag.via.u64 != kResponseTag ||
      msgid.type != msgpack::type::POSITIVE_INTEGER ||
      msgid.via.u64 > std::numeric_limits<std::uint32_t>::max()) {
    return std::nullopt;
  }
  return static_cast<std::uint32_t>(msgid.via.u64);
}

Response decode_response(const object& msg, Method method) {
  const std::optional<std::uint32_t> msgid = response_msgid(msg);
  if (!msgid) {
    bad("message", "not a response [1, msgid, error, result]");
  }
  const object& error = msg.via.array.ptr[2];
  const object& result = msg.via.array.ptr[3];
  const bool has_error = error.type != msgpack::type::NIL;
  const bool has_result = result.type != msgpack::type::NIL;
  if (has_error == has_result) {
    bad("message", has_error ? "both error and result are set" : "neither error nor result is set");
  }
  if (has_error) {
    return Response{*msgid, decode_error(error, "error")};
  }
  return Response{*msgid, decode_result(result, method)};
}

}  // namespace hsm::protocol
