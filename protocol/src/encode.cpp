// Encoding of requests and responses with msgpack::packer, straight into the caller's sbuffer.
// Strings are packed as str, byte strings as bin; absent optional fields are left out of maps.
#include <array>
#include <bit>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "hsm/protocol/codec.hpp"
#include "wire_keys.hpp"

namespace hsm::protocol {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

// MessagePack lengths are 32-bit; the codec's limits keep every real value far below that.
std::uint32_t wire_length(std::size_t size) {
  if (size > std::numeric_limits<std::uint32_t>::max()) {
    throw std::length_error("hsm::protocol: value too long for MessagePack");
  }
  return static_cast<std::uint32_t>(size);
}

void pack_str(Packer& pk, std::string_view value) {
  pk.pack_str(wire_length(value.size()));
  pk.pack_str_body(value.data(), static_cast<std::uint32_t>(value.size()));
}

void pack_bin(Packer& pk, std::span<const std::uint8_t> value) {
  pk.pack_bin(wire_length(value.size()));
  // An empty vector's data() may be null; pack_bin_body copies nothing then.
  pk.pack_bin_body(reinterpret_cast<const char*>(value.data()),
                   static_cast<std::uint32_t>(value.size()));
}

// msgpack-c's pack_double() writes a whole-valued double as an integer; the protocol promises a
// float64 (0xcb, big-endian IEEE 754), so write it by hand. The packer writes straight through to
// `out`, so interleaving is safe.
void pack_float64(msgpack::sbuffer& out, double value) {
  const auto bits = std::bit_cast<std::uint64_t>(value);
  std::array<char, 9> bytes{};
  bytes[0] = static_cast<char>(0xcbU);
  for (std::size_t i = 0; i < 8; ++i) {
    bytes[1 + i] = static_cast<char>((bits >> (56U - 8U * i)) & 0xFFU);
  }
  out.write(bytes.data(), bytes.size());
}

void pack_bool(Packer& pk, bool value) {
  if (value) {
    pk.pack_true();
  } else {
    pk.pack_false();
  }
}

template <typename T>
std::uint32_t present(const std::optional<T>& value) {
  return value.has_value() ? 1U : 0U;
}

void pack_jwk(Packer& pk, const Jwk& jwk) {
  pk.pack_map(wire_length(jwk.size()));
  for (const auto& [name, value] : jwk) {
    pack_str(pk, name);
    pack_str(pk, value);
  }
}

void pack_error(Packer& pk, const Error& error) {
  pk.pack_map(2 + present(error.ckr));
  pack_str(pk, wire::kCode);
  pack_str(pk, to_string(error.code));
  pack_str(pk, wire::kMessage);
  pack_str(pk, error.message);
  if (error.ckr) {
    pack_str(pk, wire::kCkr);
    pack_str(pk, *error.ckr);
  }
}

// ---- Request parameters ----------------------------------------------------------------------

// The fields shared by sign, verify and sign_batch items (kid, data|digest, alg, format),
// without the map header.
struct SignFields {
  const std::string& kid;
  const SignInput& input;
  const std::optional<std::string>& alg;
  const std::optional<SignatureFormat>& format;

  [[nodiscard]] std::uint32_t count() const { return 2 + present(alg) + present(format); }

  void pack(Packer& pk) const {
    pack_str(pk, wire::kKid);
    pack_str(pk, kid);
    pack_str(pk, is_digest(input) ? wire::kDigest : wire::kData);
    pack_bin(pk, input_bytes(input));
    if (alg) {
      pack_str(pk, wire::kAlg);
      pack_str(pk, *alg);
    }
    if (format) {
      pack_str(pk, wire::kFormat);
      pack_str(pk, to_string(*format));
    }
  }
};

SignFields sign_fields(const SignParams& p) {
  return {p.kid, p.input, p.alg, p.format};
}

// Each overload packs the method's own fields; `extra` fields (timeout_ms) are counted in the
// map header by the caller and packed after these.
struct ParamsPacker {
  Packer& pk;
  std::uint32_t extra;

  void operator()(const EmptyParams&) const { pk.pack_map(extra); }

  void operator()(const KidParams& p) const {
    pk.pack_map(1 + extra);
    pack_str(pk, wire::kKid);
    pack_str(pk, p.kid);
  }

  void operator()(const GenerateKeyParams& p) const {
    pk.pack_map(1 + present(p.alg) + present(p.rsa_bits) + extra);
    pack_str(pk, wire::kKid);
    pack_str(pk, p.kid);
    if (p.alg) {
      pack_str(pk, wire::kAlg);
      pack_str(pk, *p.alg);
    }
    if (p.rsa_bits) {
      pack_str(pk, wire::kRsaBits);
      pk.pack_uint32(*p.rsa_bits);
    }
  }

  void operator()(const SignParams& p) const {
    const SignFields fields = sign_fields(p);
    pk.pack_map(fields.count() + extra);
    fields.pack(pk);
  }

  void operator()(const VerifyParams& p) const {
    const SignFields fields{p.kid, p.input, p.alg, p.format};
    pk.pack_map(fields.count() + 1 + extra);
    fields.pack(pk);
    pack_str(pk, wire::kSignature);
    pack_bin(pk, p.signature);
  }

  void operator()(const SignBatchParams& p) const {
    pk.pack_map(1 + extra);
    pack_str(pk, wire::kItems);
    pk.pack_array(wire_length(p.items.size()));
    for (const auto& item : p.items) {
      const SignFields fields = sign_fields(item);
      pk.pack_map(fields.count());
      fields.pack(pk);
    }
  }
};

// ---- Results -----------------------------------------------------------------------------------

void pack_key_description(Packer& pk, const KeyDescription& key) {
  pk.pack_map(3);
  pack_str(pk, wire::kKid);
  pack_str(pk, key.kid);
  pack_str(pk, wire::kAlg);
  pack_str(pk, key.alg);
  pack_str(pk, wire::kJwk);
  pack_jwk(pk, key.jwk);
}

struct ResultPacker {
  Packer& pk;
  msgpack::sbuffer& out;

  void operator()(const CapabilitiesResult& r) const {
    pk.pack_map(9);
    pack_str(pk, wire::kProtocol);
    pk.pack_uint32(r.protocol);
    pack_str(pk, wire::kAgentVersion);
    pack_str(pk, r.agent_version);
    pack_str(pk, wire::kCanCreate);
    pack_bool(pk, r.can_create);
    pack_str(pk, wire::kCanImport);
    pack_bool(pk, r.can_import);
    pack_str(pk, wire::kCanDelete);
    pack_bool(pk, r.can_delete);
    pack_str(pk, wire::kSupportedAlgs);
    pk.pack_array(wire_length(r.supported_algs.size()));
    for (const auto& alg : r.supported_algs) {
      pack_str(pk, alg);
    }
    pack_str(pk, wire::kDefaultAlg);
    pack_str(pk, r.default_alg);
    pack_str(pk, wire::kMaxMessageBytes);
    pk.pack_uint64(r.max_message_bytes);
    pack_str(pk, wire::kMetricsUrl);
    if (r.metrics_url) {
      pack_str(pk, *r.metrics_url);
    } else {
      pk.pack_nil();
    }
  }

  void operator()(const HealthResult& r) const {
    pk.pack_map(4);
    pack_str(pk, wire::kOk);
    pack_bool(pk, r.ok);
    pack_str(pk, wire::kLatencyMs);
    pack_float64(out, r.latency_ms);
    pack_str(pk, wire::kError);
    if (r.error) {
      pack_str(pk, *r.error);
    } else {
      pk.pack_nil();
    }
    pack_str(pk, wire::kToken);
    pk.pack_map(4);
    pack_str(pk, wire::kLabel);
    pack_str(pk, r.token.label);
    pack_str(pk, wire::kManufacturer);
    pack_str(pk, r.token.manufacturer);
    pack_str(pk, wire::kModel);
    pack_str(pk, r.token.model);
    pack_str(pk, wire::kSerial);
    pack_str(pk, r.token.serial);
  }

  void operator()(const KeyDescription& r) const { pack_key_description(pk, r); }

  void operator()(const SignResult& r) const {
    pk.pack_map(3);
    pack_str(pk, wire::kKid);
    pack_str(pk, r.kid);
    pack_str(pk, wire::kAlg);
    pack_str(pk, r.alg);
    pack_str(pk, wire::kSignature);
    pack_bin(pk, r.signature);
  }

  void operator()(const VerifyResult& r) const {
    pk.pack_map(1);
    pack_str(pk, wire::kValid);
    pack_bool(pk, r.valid);
  }

  void operator()(const PublicKeyResult& r) const {
    pk.pack_map(4);
    pack_str(pk, wire::kKid);
    pack_str(pk, r.kid);
    pack_str(pk, wire::kAlg);
    pack_str(pk, r.alg);
    pack_str(pk, wire::kJwk);
    pack_jwk(pk, r.jwk);
    pack_str(pk, wire::kSpki);
    pack_bin(pk, r.spki);
  }

  void operator()(const ListKeysResult& r) const {
    pk.pack_map(1);
    pack_str(pk, wire::kKeys);
    pk.pack_array(wire_length(r.keys.size()));
    for (const auto& key : r.keys) {
      pack_key_description(pk, key);
    }
  }

  void operator()(const DeleteKeyResult& r) const {
    pk.pack_map(1);
    pack_str(pk, wire::kDeleted);
    pack_bool(pk, r.deleted);
  }

  void operator()(const JwksResult& r) const {
    pk.pack_map(1);
    pack_str(pk, wire::kKeys);
    pk.pack_array(wire_length(r.keys.size()));
    for (const auto& jwk : r.keys) {
      pack_jwk(pk, jwk);
    }
  }

  void operator()(const SignBatchResult& r) const {
    pk.pack_map(1);
    pack_str(pk, wire::kResults);
    pk.pack_array(wire_length(r.results.size()));
    for (const auto& item : r.results) {
      pk.pack_map(1);
      if (const auto* signature = std::get_if<Bytes>(&item)) {
        pack_str(pk, wire::kSignature);
        pack_bin(pk, *signature);
      } else {
        pack_str(pk, wire::kError);
        pack_error(pk, std::get<Error>(item));
      }
    }
  }
};

}  // namespace

void encode_request(const Request& request, msgpack::sbuffer& out) {
  Packer pk(out);
  pk.pack_array(4);
  pk.pack_uint8(kRequestTag);
  pk.pack_uint32(request.msgid);
  pack_str(pk, to_string(request.method));
  pk.pack_array(1);
  const std::uint32_t extra = present(request.timeout_ms);
  std::visit(ParamsPacker{pk, extra}, request.params);
  if (request.timeout_ms) {
    pack_str(pk, wire::kTimeoutMs);
    pk.pack_uint32(*request.timeout_ms);
  }
}

void encode_response(const Response& response, msgpack::sbuffer& out) {
  Packer pk(out);
  pk.pack_array(4);
  pk.pack_uint8(kResponseTag);
  pk.pack_uint32(response.msgid);
  if (const auto* error = std::get_if<Error>(&response.body)) {
    pack_error(pk, *error);
    pk.pack_nil();
  } else {
    pk.pack_nil();
    std::visit(ResultPacker{pk, out}, std::get<Result>(response.body));
  }
}

}  // namespace hsm::protocol
