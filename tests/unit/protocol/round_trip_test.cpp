// encode_request -> bytes -> FrameReader -> decode_request gives the request back, for every
// method; the same for every response type through decode_response. Also pins wire types (str vs
// bin, float64, nil) and the exact bytes of the README's worked example.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "hsm/protocol/codec.hpp"
#include "object_builder.hpp"

using namespace hsm::protocol;
using hsm::protocol::test::bytes_of;

namespace {

msgpack::object_handle unpack_one(const msgpack::sbuffer& buffer) {
  FrameReader reader;
  reader.feed({buffer.data(), buffer.size()});
  auto message = reader.next();
  REQUIRE(message.has_value());
  REQUIRE_FALSE(reader.next().has_value());
  REQUIRE(reader.buffered_bytes() == 0);
  return std::move(*message);
}

Request round_trip(const Request& request) {
  msgpack::sbuffer buffer;
  encode_request(request, buffer);
  const msgpack::object_handle message = unpack_one(buffer);
  auto decoded = decode_request(message.get());
  if (const auto* error = std::get_if<RequestDecodeError>(&decoded)) {
    FAIL("decode_request failed: " << error->error.message);
  }
  return std::get<Request>(decoded);
}

Response round_trip(const Response& response, Method method) {
  msgpack::sbuffer buffer;
  encode_response(response, buffer);
  const msgpack::object_handle message = unpack_one(buffer);
  CHECK(response_msgid(message.get()) == response.msgid);
  return decode_response(message.get(), method);
}

std::string hex(const msgpack::sbuffer& buffer) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < buffer.size(); ++i) {
    const auto byte = static_cast<unsigned char>(buffer.data()[i]);
    out += kDigits[byte >> 4U];
    out += kDigits[byte & 0x0FU];
  }
  return out;
}

/// The value of `key` in the params map of an encoded request.
const msgpack::object* param(const msgpack::object& request, std::string_view key) {
  const msgpack::object& map = request.via.array.ptr[3].via.array.ptr[0];
  for (std::uint32_t i = 0; i < map.via.map.size; ++i) {
    const auto& kv = map.via.map.ptr[i];
    if (std::string_view(kv.key.via.str.ptr, kv.key.via.str.size) == key) {
      return &kv.val;
    }
  }
  return nullptr;
}

const msgpack::object* field(const msgpack::object& map, std::string_view key) {
  for (std::uint32_t i = 0; i < map.via.map.size; ++i) {
    const auto& kv = map.via.map.ptr[i];
    if (std::string_view(kv.key.via.str.ptr, kv.key.via.str.size) == key) {
      return &kv.val;
    }
  }
  return nullptr;
}

Jwk ec_jwk(const std::string& kid) {
  return Jwk{{"kty", "EC"},
             {"crv", "P-256"},
             {"x", "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"},
             {"y", "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
             {"kid", kid},
             {"alg", "ES256"},
             {"use", "sig"}};
}

}  // namespace

TEST_CASE("every request round-trips through the codec", "[codec][round-trip]") {
  const Bytes data = bytes_of("header.payload");
  const Bytes digest(32, 0xAB);
  const Bytes signature(64, 0x5C);
  const std::vector<Request> requests = {
      Request{1, Method::kCapabilities, EmptyParams{}, std::nullopt},
      Request{2, Method::kHealth, EmptyParams{}, 250},
      Request{3, Method::kListKeys, EmptyParams{}, std::nullopt},
      Request{4, Method::kGetJwks, EmptyParams{}, 1},
      Request{5, Method::kImportKey, EmptyParams{}, std::nullopt},
      Request{6, Method::kGetPublicKey, KidParams{"key-1"}, std::nullopt},
      Request{7, Method::kDeleteKey, KidParams{"key-2"}, 5000},
      Request{8, Method::kGenerateKey, GenerateKeyParams{"k", std::nullopt, std::nullopt},
              std::nullopt},
      Request{9, Method::kGenerateKey, GenerateKeyParams{"rsa", "PS384", 3072}, 30000},
      Request{10, Method::kSign, SignParams{"k", Data{data}, std::nullopt, std::nullopt},
              std::nullopt},
      Request{11, Method::kSign, SignParams{"k", Digest{digest}, "ES256", SignatureFormat::kDer},
              100},
      Request{12, Method::kSign,
              SignParams{"k", Data{Bytes{}}, std::nullopt, SignatureFormat::kRaw}, std::nullopt},
      Request{13, Method::kVerify,
              VerifyParams{"k", Data{data}, signature, std::nullopt, std::nullopt}, std::nullopt},
      Request{14, Method::kVerify,
              VerifyParams{"k", Digest{digest}, signature, "ES256", SignatureFormat::kDer}, 7},
      Request{15, Method::kSignBatch,
              SignBatchParams{{SignParams{"a", Data{data}, std::nullopt, std::nullopt},
                               SignParams{"b", Digest{digest}, "ES256K", SignatureFormat::kDer}}},
              std::nullopt},
      Request{4294967295U, Method::kSign,
              SignParams{"\xC3\xA9t\xC3\xA9", Data{data}, "EdDSA", std::nullopt}, 4294967295U},
  };
  for (const Request& request : requests) {
    INFO("msgid " << request.msgid << " method " << to_string(request.method));
    CHECK(round_trip(request) == request);
  }
}

TEST_CASE("a batch of the maximum size round-trips", "[codec][round-trip]") {
  SignBatchParams batch;
  for (std::size_t i = 0; i < kMaxBatchItems; ++i) {
    batch.items.push_back(
        SignParams{"key-" + std::to_string(i), Data{Bytes(i % 7, 1)}, std::nullopt, std::nullopt});
  }
  const Request request{42, Method::kSignBatch, batch, std::nullopt};
  CHECK(round_trip(request) == request);
}

TEST_CASE("requests carry strings as str, bytes as bin, and omit absent optionals",
          "[codec][wire]") {
  msgpack::sbuffer buffer;
  encode_request(
      Request{9, Method::kVerify,
              VerifyParams{"k", Data{bytes_of("abc")}, Bytes(64, 1), "ES256", std::nullopt},
              std::nullopt},
      buffer);
  const auto message = msgpack::unpack(buffer.data(), buffer.size());
  const msgpack::object& msg = message.get();
  REQUIRE(msg.type == msgpack::type::ARRAY);
  REQUIRE(msg.via.array.size == 4);
  CHECK(msg.via.array.ptr[0].via.u64 == 0);
  CHECK(msg.via.array.ptr[1].via.u64 == 9);
  CHECK(msg.via.array.ptr[2].type == msgpack::type::STR);
  REQUIRE(msg.via.array.ptr[3].type == msgpack::type::ARRAY);
  REQUIRE(msg.via.array.ptr[3].via.array.size == 1);
  CHECK(msg.via.array.ptr[3].via.array.ptr[0].via.map.size == 4);  // kid, data, signature, alg
  CHECK(param(msg, "kid")->type == msgpack::type::STR);
  CHECK(param(msg, "alg")->type == msgpack::type::STR);
  CHECK(param(msg, "data")->type == msgpack::type::BIN);
  CHECK(param(msg, "signature")->type == msgpack::type::BIN);
  CHECK(param(msg, "digest") == nullptr);
  CHECK(param(msg, "format") == nullptr);
  CHECK(param(msg, "timeout_ms") == nullptr);

  msgpack::sbuffer empty;
  encode_request(Request{1, Method::kHealth, EmptyParams{}, std::nullopt}, empty);
  const auto health = msgpack::unpack(empty.data(), empty.size());
  const msgpack::object& params = health.get().via.array.ptr[3];
  REQUIRE(params.via.array.size == 1);
  CHECK(params.via.array.ptr[0].type == msgpack::type::MAP);
  CHECK(params.via.array.ptr[0].via.map.size == 0);
}

TEST_CASE("the README's worked example encodes to the documented bytes", "[codec][wire]") {
  msgpack::sbuffer request;
  encode_request(
      Request{1, Method::kSign,
              SignParams{"k1", Data{bytes_of("hello")}, std::nullopt, std::nullopt}, std::nullopt},
      request);
  CHECK(hex(request) == "940001a47369676e9182a36b6964a26b31a464617461c40568656c6c6f");

  Bytes signature;
  for (std::uint8_t i = 1; i <= 64; ++i) {
    signature.push_back(i);
  }
  msgpack::sbuffer sign_response;
  encode_response(Response{1, Result{SignResult{"k1", "ES256", signature}}}, sign_response);
  CHECK(hex(sign_response) ==
        "940101c083a36b6964a26b31a3616c67a54553323536a97369676e6174757265c440"
        "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"
        "2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40");

  msgpack::sbuffer health;
  encode_request(Request{2, Method::kHealth, EmptyParams{}, std::nullopt}, health);
  CHECK(hex(health) == "940002a66865616c74689180");

  msgpack::sbuffer response;
  encode_response(Response{1, Result{VerifyResult{true}}}, response);
  CHECK(hex(response) == "940101c081a576616c6964c3");

  msgpack::sbuffer error;
  encode_response(Response{7, Error{ErrorCode::kNotFound, "no key with kid 'k9'", std::nullopt}},
                  error);
  CHECK(hex(error) ==
        "940107"
        "82a4636f6465a96e6f745f666f756e64"
        "a76d657373616765b46e6f206b65792077697468206b696420276b3927"
        "c0");
}

TEST_CASE("every response round-trips through the codec", "[codec][round-trip]") {
  struct Case {
    Method method;
    Response response;
  };
  const std::vector<Case> cases = {
      {Method::kCapabilities,
       Response{1, Result{CapabilitiesResult{1,
                                             "0.1.0",
                                             true,
                                             false,
                                             true,
                                             {"ES256", "ES384", "RS256", "EdDSA"},
                                             "ES256",
                                             1048576,
                                             "http://127.0.0.1:9464/metrics"}}}},
      {Method::kCapabilities,
       Response{2, Result{CapabilitiesResult{1, "", false, false, false, {}, "", 0}}}},
      {Method::kHealth,
       Response{3, Result{HealthResult{
                       true, 0.125, std::nullopt,
                       TokenDescription{"tok", "SoftHSM project", "SoftHSM v2", "abc123"}}}}},
      {Method::kHealth,
       Response{4, Result{HealthResult{false, 5000.5, "CKR_DEVICE_ERROR", TokenDescription{}}}}},
      {Method::kGenerateKey, Response{5, Result{KeyDescription{"k", "ES256", ec_jwk("k")}}}},
      {Method::kSign, Response{6, Result{SignResult{"k", "ES256", Bytes(64, 0x11)}}}},
      {Method::kVerify, Response{7, Result{VerifyResult{false}}}},
      {Method::kVerify, Response{8, Result{VerifyResult{true}}}},
      {Method::kGetPublicKey,
       Response{9, Result{PublicKeyResult{"k", "ES256", ec_jwk("k"), Bytes(91, 0x30)}}}},
      {Method::kListKeys, Response{10, Result{ListKeysResult{}}}},
      {Method::kListKeys,
       Response{11, Result{ListKeysResult{
                        {KeyDescription{"a", "ES256", ec_jwk("a")},
                         KeyDescription{"b", "RS256", Jwk{{"kty", "RSA"}, {"n", "AQAB"}}}}}}}},
      {Method::kDeleteKey, Response{12, Result{DeleteKeyResult{true}}}},
      {Method::kDeleteKey, Response{13, Result{DeleteKeyResult{false}}}},
      {Method::kGetJwks, Response{14, Result{JwksResult{{ec_jwk("a"), ec_jwk("b")}}}}},
      {Method::kGetJwks, Response{15, Result{JwksResult{}}}},
      {Method::kSignBatch,
       Response{16, Result{SignBatchResult{
                        {Bytes(64, 1), Error{ErrorCode::kNotFound, "no key 'x'", std::nullopt},
                         Error{ErrorCode::kHsmError, "C_Sign failed", "CKR_FUNCTION_FAILED"},
                         Bytes(96, 2)}}}}},
      {Method::kSign,
       Response{17, Error{ErrorCode::kHsmUnavailable, "token gone", "CKR_DEVICE_REMOVED"}}},
      {Method::kImportKey, Response{18, Error{ErrorCode::kNotSupported,
                                              "keys are generated in the HSM", std::nullopt}}},
      {Method::kHealth,
       Response{4294967295U, Error{ErrorCode::kDeadlineExceeded, "", std::nullopt}}},
  };
  for (const Case& c : cases) {
    INFO("msgid " << c.response.msgid << " method " << to_string(c.method));
    CHECK(round_trip(c.response, c.method) == c.response);
  }
  for (const ErrorCode code : all_error_codes()) {
    const Response response{77, Error{code, "message", std::nullopt}};
    CHECK(round_trip(response, Method::kSign) == response);
  }
}

TEST_CASE("responses carry the documented wire types", "[codec][wire]") {
  msgpack::sbuffer buffer;
  encode_response(Response{3, Result{HealthResult{true, 2.0, std::nullopt, TokenDescription{}}}},
                  buffer);
  auto message = msgpack::unpack(buffer.data(), buffer.size());
  const msgpack::object& health = message.get().via.array.ptr[3];
  CHECK(message.get().via.array.ptr[2].type == msgpack::type::NIL);
  CHECK(field(health, "latency_ms")->type == msgpack::type::FLOAT64);
  CHECK(field(health, "error")->type == msgpack::type::NIL);
  CHECK(field(health, "ok")->type == msgpack::type::BOOLEAN);
  CHECK(field(health, "token")->type == msgpack::type::MAP);

  buffer.clear();
  encode_response(Response{4, Result{PublicKeyResult{"k", "ES256", ec_jwk("k"), Bytes(3, 0)}}},
                  buffer);
  message = msgpack::unpack(buffer.data(), buffer.size());
  const msgpack::object& key = message.get().via.array.ptr[3];
  CHECK(field(key, "spki")->type == msgpack::type::BIN);
  CHECK(field(key, "kid")->type == msgpack::type::STR);
  const msgpack::object* jwk = field(key, "jwk");
  REQUIRE(jwk->type == msgpack::type::MAP);
  CHECK(field(*jwk, "x")->type == msgpack::type::STR);

  buffer.clear();
  encode_response(Response{5, Error{ErrorCode::kHsmError, "C_Sign failed", "CKR_DEVICE_ERROR"}},
                  buffer);
  message = msgpack::unpack(buffer.data(), buffer.size());
  const msgpack::object& error = message.get().via.array.ptr[2];
  CHECK(message.get().via.array.ptr[3].type == msgpack::type::NIL);
  REQUIRE(error.type == msgpack::type::MAP);
  CHECK(error.via.map.size == 3);
  CHECK(field(error, "ckr")->type == msgpack::type::STR);

  buffer.clear();
  encode_response(Response{6, Error{ErrorCode::kNotFound, "no key", std::nullopt}}, buffer);
  message = msgpack::unpack(buffer.data(), buffer.size());
  CHECK(message.get().via.array.ptr[2].via.map.size == 2);  // no ckr key when unset

  buffer.clear();
  encode_response(Response{7, Result{SignBatchResult{{Bytes(2, 9)}}}}, buffer);
  message = msgpack::unpack(buffer.data(), buffer.size());
  const msgpack::object* results = field(message.get().via.array.ptr[3], "results");
  REQUIRE(results->type == msgpack::type::ARRAY);
  CHECK(field(results->via.array.ptr[0], "signature")->type == msgpack::type::BIN);
}
