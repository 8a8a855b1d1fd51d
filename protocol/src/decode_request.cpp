// Request decoding: checks the msgpack-rpc shape [0, msgid, method, [params-map]] and every
// parameter, reading msgpack::object fields in place. This is the agent's hot path: no
// intermediate containers, no exceptions and no allocation beyond the Request's own values on
// success; error messages are only built on failure.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

#include "hsm/common/utf8.hpp"
#include "hsm/protocol/codec.hpp"
#include "object_view.hpp"
#include "wire_keys.hpp"

namespace hsm::protocol {
namespace {

using detail::printable;
using detail::str_view;
using detail::type_name;
using msgpack::object;

// ---- Parameter tables ------------------------------------------------------------------------

enum class Param : std::uint8_t {
  kKid,
  kAlg,
  kRsaBits,
  kData,
  kDigest,
  kSignature,
  kFormat,
  kTimeoutMs,
  kItems,
};
inline constexpr std::size_t kParamCount = 9;

// Indexed by Param.
constexpr std::array<std::string_view, kParamCount> kParamNames = {
    wire::kKid,       wire::kAlg,    wire::kRsaBits,   wire::kData,  wire::kDigest,
    wire::kSignature, wire::kFormat, wire::kTimeoutMs, wire::kItems,
};

using ParamSet = std::uint16_t;

constexpr ParamSet bit(Param p) {
  return static_cast<ParamSet>(1U << static_cast<unsigned>(p));
}

constexpr ParamSet set_of(std::initializer_list<Param> params) {
  ParamSet set = 0;
  for (const Param p : params) {
    set = static_cast<ParamSet>(set | bit(p));
  }
  return set;
}

using enum Param;

/// What one sign_batch item may hold: sign's parameters without timeout_ms (the deadline is the
/// batch's).
constexpr ParamSet kSignItemParams = set_of({kKid, kData, kDigest, kAlg, kFormat});

/// The parameters each method accepts, indexed by Method. import_key is not listed: its params
/// map is accepted whatever it holds, since the agent answers not_supported anyway.
constexpr std::array<std::pair<Method, ParamSet>, 11> kMethodParams = {{
    {Method::kCapabilities, set_of({kTimeoutMs})},
    {Method::kHealth, set_of({kTimeoutMs})},
    {Method::kGenerateKey, set_of({kKid, kAlg, kRsaBits, kTimeoutMs})},
    {Method::kImportKey, 0},
    {Method::kSign, static_cast<ParamSet>(kSignItemParams | bit(kTimeoutMs))},
    {Method::kVerify, static_cast<ParamSet>(kSignItemParams | bit(kSignature) | bit(kTimeoutMs))},
    {Method::kGetPublicKey, set_of({kKid, kTimeoutMs})},
    {Method::kListKeys, set_of({kTimeoutMs})},
    {Method::kDeleteKey, set_of({kKid, kTimeoutMs})},
    {Method::kGetJwks, set_of({kTimeoutMs})},
    {Method::kSignBatch, set_of({kItems, kTimeoutMs})},
}};

constexpr bool methods_in_order() {
  for (std::size_t i = 0; i < kMethodParams.size(); ++i) {
    if (static_cast<std::size_t>(kMethodParams[i].first) != i) {
      return false;
    }
  }
  return true;
}
static_assert(methods_in_order(), "kMethodParams must follow the declaration order of Method");

/// The value of each parameter present in one params map (null when absent). The pointers refer
/// into the message being decoded.
using Fields = std::array<const object*, kParamCount>;

/// Where a parameter lives: the top-level params map, or item `index` of sign_batch's items.
using ItemIndex = std::optional<std::size_t>;

// ---- Decoder ---------------------------------------------------------------------------------

/// Reads parameters of one request; every read returns false after recording a message that
/// names the method and the parameter.
class ParamsDecoder {
 public:
  explicit ParamsDecoder(Method method) : method_(method) {}

  [[nodiscard]] std::string take_error() { return std::move(error_); }

  /// Fills `fields` from `map`, rejecting names outside `allowed`, non-str names and duplicates.
  [[nodiscard]] bool collect(const object& map, ParamSet allowed, Fields& fields, ItemIndex item) {
    fields.fill(nullptr);
    const msgpack::object_kv* const end = map.via.map.ptr + map.via.map.size;
    for (const msgpack::object_kv* kv = map.via.map.ptr; kv != end; ++kv) {
      if (kv->key.type != msgpack::type::STR) {
        return fail_with((item ? "in 'items[" + std::to_string(*item) + "]', " : std::string()) +
                         "parameter names must be str, not " + std::string(type_name(kv->key)));
      }
      const std::string_view name = str_view(kv->key);
      const std::optional<Param> param = find(name, allowed);
      if (!param) {
        return fail_with("unknown parameter '" + where(item, printable(name)) + "'");
      }
      const auto index = static_cast<std::size_t>(*param);
      if (fields[index] != nullptr) {
        return fail(item, *param, "appears twice");
      }
      fields[index] = &kv->val;
    }
    return true;
  }

  [[nodiscard]] bool kid(const Fields& fields, ItemIndex item, std::string& out) {
    const object* value = fields[static_cast<std::size_t>(kKid)];
    if (value == nullptr) {
      return missing(item, kKid);
    }
    if (!expect(*value, msgpack::type::STR, item, kKid)) {
      return false;
    }
    const std::string_view kid = str_view(*value);
    if (auto problem = kid_problem(kid)) {
      return fail(item, kKid, *problem);
    }
    out.assign(kid);
    return true;
  }

  [[nodiscard]] bool optional_str(const Fields& fields, Param param, ItemIndex item,
                                  std::optional<std::string>& out) {
    const object* value = fields[static_cast<std::size_t>(param)];
    if (value == nullptr) {
      return true;
    }
    if (!expect(*value, msgpack::type::STR, item, param)) {
      return false;
    }
    out.emplace(str_view(*value));
    return true;
  }

  [[nodiscard]] bool optional_bin(const Fields& fields, Param param, ItemIndex item,
                                  std::optional<Bytes>& out) {
    const object* value = fields[static_cast<std::size_t>(param)];
    if (value == nullptr) {
      return true;
    }
    if (!expect(*value, msgpack::type::BIN, item, param)) {
      return false;
    }
    const auto* bytes = reinterpret_cast<const std::uint8_t*>(value->via.bin.ptr);
    out.emplace(bytes, bytes + value->via.bin.size);
    return true;
  }

  [[nodiscard]] bool required_bin(const Fields& fields, Param param, ItemIndex item, Bytes& out) {
    std::optional<Bytes> value;
    if (!optional_bin(fields, param, item, value)) {
      return false;
    }
    if (!value) {
      return missing(item, param);
    }
    out = std::move(*value);
    return true;
  }

  /// A uint32; when `positive`, zero is refused too.
  [[nodiscard]] bool optional_u32(const Fields& fields, Param param, ItemIndex item, bool positive,
                                  std::optional<std::uint32_t>& out) {
    const object* value = fields[static_cast<std::size_t>(param)];
    if (value == nullptr) {
      return true;
    }
    const bool is_uint = value->type == msgpack::type::POSITIVE_INTEGER;
    if (!is_uint || value->via.u64 > std::numeric_limits<std::uint32_t>::max() ||
        (positive && value->via.u64 == 0)) {
      return fail(item, param,
                  std::string(positive ? "must be an unsigned integer in 1..4294967295"
                                       : "must be an unsigned integer in 0..4294967295") +
                      (is_uint ? "" : ", not " + std::string(type_name(*value))));
    }
    out = static_cast<std::uint32_t>(value->via.u64);
    return true;
  }

  [[nodiscard]] bool format(const Fields& fields, ItemIndex item,
                            std::optional<SignatureFormat>& out) {
    const object* value = fields[static_cast<std::size_t>(kFormat)];
    if (value == nullptr) {
      return true;
    }
    if (!expect(*value, msgpack::type::STR, item, kFormat)) {
      return false;
    }
    out = parse_signature_format(str_view(*value));
    if (!out) {
      return fail(item, kFormat, "must be \"raw\" or \"der\"");
    }
    return true;
  }

  /// data or digest, exactly one.
  [[nodiscard]] bool sign_input(const Fields& fields, ItemIndex item, SignInput& out) {
    const bool has_data = fields[static_cast<std::size_t>(kData)] != nullptr;
    const bool has_digest = fields[static_cast<std::size_t>(kDigest)] != nullptr;
    if (has_data == has_digest) {
      return fail_with(std::string("exactly one of 'data' and 'digest' is required (got ") +
                       (has_data ? "both" : "neither") + ")");
    }
    std::optional<Bytes> bytes;
    if (!optional_bin(fields, has_data ? kData : kDigest, item, bytes)) {
      return false;
    }
    if (has_data) {
      out = Data{std::move(*bytes)};
    } else {
      out = Digest{std::move(*bytes)};
    }
    return true;
  }

  /// The parameters sign and sign_batch items share: kid, data|digest, alg, format.
  [[nodiscard]] bool sign_params(const Fields& fields, ItemIndex item, SignParams& out) {
    return kid(fields, item, out.kid) && sign_input(fields, item, out.input) &&
           optional_str(fields, kAlg, item, out.alg) && format(fields, item, out.format);
  }

  [[nodiscard]] bool batch_items(const Fields& fields, std::vector<SignParams>& out) {
    const object* value = fields[static_cast<std::size_t>(kItems)];
    if (value == nullptr) {
      return missing(std::nullopt, kItems);
    }
    if (!expect(*value, msgpack::type::ARRAY, std::nullopt, kItems)) {
      return false;
    }
    const std::size_t count = value->via.array.size;
    if (count == 0 || count > kMaxBatchItems) {
      return fail(std::nullopt, kItems,
                  "must hold 1.." + std::to_string(kMaxBatchItems) + " items (got " +
                      std::to_string(count) + ")");
    }
    out.resize(count);
    Fields item_fields{};
    for (std::size_t i = 0; i < count; ++i) {
      const object& entry = value->via.array.ptr[i];
      if (entry.type != msgpack::type::MAP) {
        return fail_with("parameter 'items[" + std::to_string(i) + "]' must be map, not " +
                         std::string(type_name(entry)));
      }
      if (!collect(entry, kSignItemParams, item_fields, i) ||
          !sign_params(item_fields, i, out[i])) {
        return false;
      }
    }
    return true;
  }

 private:
  static std::optional<Param> find(std::string_view name, ParamSet allowed) noexcept {
    for (std::size_t i = 0; i < kParamCount; ++i) {
      const auto param = static_cast<Param>(i);
      if ((allowed & bit(param)) != 0 && kParamNames[i] == name) {
        return param;
      }
    }
    return std::nullopt;
  }

  static std::string where(ItemIndex item, std::string_view name) {
    if (!item) {
      return std::string(name);
    }
    return "items[" + std::to_string(*item) + "]." + std::string(name);
  }

  [[nodiscard]] bool expect(const object& value, msgpack::type::object_type type, ItemIndex item,
                            Param param) {
    if (value.type == type) {
      return true;
    }
    object expected;
    expected.type = type;
    return fail(
        item, param,
        "must be " + std::string(type_name(expected)) + ", not " + std::string(type_name(value)));
  }

  [[nodiscard]] bool missing(ItemIndex item, Param param) {
    return fail_with("missing parameter '" +
                     where(item, kParamNames[static_cast<std::size_t>(param)]) + "'");
  }

  [[nodiscard]] bool fail(ItemIndex item, Param param, const std::string& problem) {
    return fail_with("parameter '" + where(item, kParamNames[static_cast<std::size_t>(param)]) +
                     "' " + problem);
  }

  [[nodiscard]] bool fail_with(const std::string& message) {
    error_ = std::string(to_string(method_)) + ": " + message;
    return false;
  }

  Method method_;
  std::string error_;
};

// ---- Per-method assembly -----------------------------------------------------------------------

/// Decodes the params map of `method` into its Params alternative (and timeout_ms).
/// Returns nullopt after recording the problem in `decoder`.
std::optional<Params> decode_params(Method method, const object& map, ParamsDecoder& decoder,
                                    std::optional<std::uint32_t>& timeout_ms) {
  if (method == Method::kImportKey) {
    return Params{EmptyParams{}};  // any params: answered not_supported by the agent
  }
  Fields fields{};
  const ParamSet allowed = kMethodParams[static_cast<std::size_t>(method)].second;
  if (!decoder.collect(map, allowed, fields, std::nullopt) ||
      !decoder.optional_u32(fields, kTimeoutMs, std::nullopt, /*positive=*/true, timeout_ms)) {
    return std::nullopt;
  }
  switch (method) {
    case Method::kCapabilities:
    case Method::kHealth:
    case Method::kListKeys:
    case Method::kGetJwks:
    case Method::kImportKey:
      return Params{EmptyParams{}};
    case Method::kGetPublicKey:
    case Method::kDeleteKey: {
      KidParams p;
      if (!decoder.kid(fields, std::nullopt, p.kid)) {
        return std::nullopt;
      }
      return Params{std::move(p)};
    }
    case Method::kGenerateKey: {
      GenerateKeyParams p;
      if (!decoder.kid(fields, std::nullopt, p.kid) ||
          !decoder.optional_str(fields, kAlg, std::nullopt, p.alg) ||
          !decoder.optional_u32(fields, kRsaBits, std::nullopt, /*positive=*/false, p.rsa_bits)) {
        return std::nullopt;
      }
      return Params{std::move(p)};
    }
    case Method::kSign: {
      SignParams p;
      if (!decoder.sign_params(fields, std::nullopt, p)) {
        return std::nullopt;
      }
      return Params{std::move(p)};
    }
    case Method::kVerify: {
      VerifyParams p;
      if (!decoder.kid(fields, std::nullopt, p.kid) ||
          !decoder.sign_input(fields, std::nullopt, p.input) ||
          !decoder.required_bin(fields, kSignature, std::nullopt, p.signature) ||
          !decoder.optional_str(fields, kAlg, std::nullopt, p.alg) ||
          !decoder.format(fields, std::nullopt, p.format)) {
        return std::nullopt;
      }
      return Params{std::move(p)};
    }
    case Method::kSignBatch: {
      SignBatchParams p;
      if (!decoder.batch_items(fields, p.items)) {
        return std::nullopt;
      }
      return Params{std::move(p)};
    }
  }
  return std::nullopt;  // unreachable: every Method is handled above
}

RequestDecodeError invalid(std::optional<std::uint32_t> msgid, ErrorCode code, std::string message,
                           std::optional<Method> method = std::nullopt) {
  return RequestDecodeError{msgid, Error{code, std::move(message), std::nullopt}, method};
}

}  // namespace

std::optional<std::string> kid_problem(std::string_view kid) {
  if (kid.empty()) {
    return "must not be empty";
  }
  if (kid.size() > kMaxKidBytes) {
    return "must be at most " + std::to_string(kMaxKidBytes) + " bytes (got " +
           std::to_string(kid.size()) + ")";
  }
  if (kid.find('\0') != std::string_view::npos) {
    return "must not contain NUL bytes";
  }
  if (!common::is_valid_utf8(kid)) {
    return "must be valid UTF-8";
  }
  return std::nullopt;
}

std::variant<Request, RequestDecodeError> decode_request(const object& msg) {
  // Until the tag and msgid are known this is not a request the agent can answer.
  if (msg.type != msgpack::type::ARRAY || msg.via.array.size < 2) {
    return invalid(
        std::nullopt, ErrorCode::kInvalidRequest,
        "a request is an array [0, msgid, method, params], got " + std::string(type_name(msg)));
  }
  const object* element = msg.via.array.ptr;
  if (element[0].type != msgpack::type::POSITIVE_INTEGER || element[0].via.u64 != kRequestTag) {
    return invalid(std::nullopt, ErrorCode::kInvalidRequest,
                   "not a request: the first element must be the integer 0");
  }
  if (element[1].type != msgpack::type::POSITIVE_INTEGER ||
      element[1].via.u64 > std::numeric_limits<std::uint32_t>::max()) {
    return invalid(std::nullopt, ErrorCode::kInvalidRequest,
                   "msgid must be an unsigned integer in 0..4294967295");
  }
  const auto msgid = static_cast<std::uint32_t>(element[1].via.u64);

  if (msg.via.array.size != 4) {
    return invalid(msgid, ErrorCode::kInvalidRequest,
                   "a request has 4 elements [0, msgid, method, params], got " +
                       std::to_string(msg.via.array.size));
  }
  if (element[2].type != msgpack::type::STR) {
    return invalid(msgid, ErrorCode::kInvalidRequest,
                   "method must be str, not " + std::string(type_name(element[2])));
  }
  const object& params = element[3];
  if (params.type != msgpack::type::ARRAY || params.via.array.size != 1 ||
      params.via.array.ptr[0].type != msgpack::type::MAP) {
    return invalid(msgid, ErrorCode::kInvalidRequest,
                   "params must be an array holding exactly one map");
  }
  const std::optional<Method> method = parse_method(str_view(element[2]));
  if (!method) {
    return invalid(msgid, ErrorCode::kUnknownMethod,
                   "unknown method '" + printable(str_view(element[2])) + "'");
  }

  ParamsDecoder decoder(*method);
  std::optional<std::uint32_t> timeout_ms;
  std::optional<Params> decoded =
      decode_params(*method, params.via.array.ptr[0], decoder, timeout_ms);
  if (!decoded) {
    return invalid(msgid, ErrorCode::kInvalidParams, decoder.take_error(), method);
  }
  return Request{msgid, *method, std::move(*decoded), timeout_ms};
}

}  // namespace hsm::protocol
