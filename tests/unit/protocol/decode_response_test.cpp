// decode_response and response_msgid: wrong shapes throw ProtocolError naming the field.
#include <catch2/catch.hpp>
#include <functional>
#include <string>
#include <vector>

#include "hsm/protocol/codec.hpp"
#include "object_builder.hpp"

using namespace hsm::protocol;
using hsm::protocol::test::ObjectBuilder;
using Object = msgpack::object;

namespace {

struct BadResponse {
  std::string name;
  Method method;
  std::function<Object(ObjectBuilder&)> build;
  std::string message_part;
};

Object token(ObjectBuilder& b) {
  return b.params({{"label", b.str("t")},
                   {"manufacturer", b.str("m")},
                   {"model", b.str("x")},
                   {"serial", b.str("1")}});
}

Object jwk(ObjectBuilder& b) {
  return b.params({{"kty", b.str("EC")}, {"crv", b.str("P-256")}});
}

}  // namespace

TEST_CASE("response_msgid peeks at [1, msgid, error, result]", "[decode_response]") {
  ObjectBuilder b;
  CHECK(response_msgid(b.response(7, b.nil(), b.params({{"valid", b.boolean(true)}}))) == 7U);
  CHECK(response_msgid(b.response(4294967295U, b.nil(), b.nil())) == 4294967295U);
  CHECK_FALSE(response_msgid(b.uint(1)).has_value());
  CHECK_FALSE(response_msgid(b.array({b.uint(1), b.uint(7), b.nil()})).has_value());
  CHECK_FALSE(response_msgid(b.array({b.uint(0), b.uint(7), b.nil(), b.nil()})).has_value());
  CHECK_FALSE(response_msgid(b.array({b.uint(1), b.sint(-7), b.nil(), b.nil()})).has_value());
  CHECK_FALSE(
      response_msgid(b.array({b.uint(1), b.uint(1ULL << 32U), b.nil(), b.nil()})).has_value());
  CHECK_FALSE(response_msgid(b.array({b.uint(1), b.str("7"), b.nil(), b.nil()})).has_value());
}

TEST_CASE("responses of the wrong shape throw ProtocolError", "[decode_response]") {
  const std::vector<BadResponse> cases = {
      {"not an array", Method::kSign, [](ObjectBuilder& b) { return b.params({}); },
       "not a response"},
      {"request tag", Method::kSign,
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(1), b.nil(), b.nil()});
       },
       "not a response"},
      {"three elements", Method::kSign,
       [](ObjectBuilder& b) {
         return b.array({b.uint(1), b.uint(1), b.nil()});
       },
       "not a response"},
      {"negative msgid", Method::kSign,
       [](ObjectBuilder& b) {
         return b.array({b.uint(1), b.sint(-1), b.nil(), b.nil()});
       },
       "not a response"},
      {"neither error nor result", Method::kSign,
       [](ObjectBuilder& b) { return b.response(1, b.nil(), b.nil()); }, "neither"},
      {"both error and result", Method::kVerify,
       [](ObjectBuilder& b) {
         return b.response(1, b.params({{"code", b.str("internal")}, {"message", b.str("m")}}),
                           b.params({{"valid", b.boolean(true)}}));
       },
       "both"},
      {"error not a map", Method::kSign,
       [](ObjectBuilder& b) { return b.response(1, b.str("not_found"), b.nil()); },
       "error: must be map, not str"},
      {"error without code", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(1, b.params({{"message", b.str("m")}}), b.nil());
       },
       "error: missing 'code'"},
      {"error without message", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(1, b.params({{"code", b.str("not_found")}}), b.nil());
       },
       "error: missing 'message'"},
      {"error code not str", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(1, b.params({{"code", b.uint(3)}, {"message", b.str("m")}}), b.nil());
       },
       "error.code: must be str, not uint"},
      {"ckr not str", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(
             1,
             b.params({{"code", b.str("hsm_error")}, {"message", b.str("m")}, {"ckr", b.uint(48)}}),
             b.nil());
       },
       "error.ckr: must be str"},
      {"sign result missing signature", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.params({{"kid", b.str("k")}, {"alg", b.str("ES256")}}));
       },
       "result: missing 'signature'"},
      {"signature as str", Method::kSign,
       [](ObjectBuilder& b) {
         return b.response(
             1, b.nil(),
             b.params({{"kid", b.str("k")}, {"alg", b.str("ES256")}, {"signature", b.str("sig")}}));
       },
       "result.signature: must be bin, not str"},
      {"result not a map", Method::kVerify,
       [](ObjectBuilder& b) { return b.response(1, b.nil(), b.boolean(true)); },
       "result: must be map, not bool"},
      {"valid not bool", Method::kVerify,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.params({{"valid", b.uint(1)}}));
       },
       "result.valid: must be bool"},
      {"duplicate key", Method::kDeleteKey,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"deleted", b.boolean(true)}, {"deleted", b.boolean(false)}}));
       },
       "appears twice"},
      {"non-str key", Method::kDeleteKey,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.map({{b.uint(1), b.boolean(true)}}));
       },
       "keys must be str"},
      {"capabilities alg not str", Method::kCapabilities,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"protocol", b.uint(1)},
                                     {"agent_version", b.str("v")},
                                     {"can_create", b.boolean(true)},
                                     {"can_import", b.boolean(false)},
                                     {"can_delete", b.boolean(true)},
                                     {"supported_algs", b.array({b.str("ES256"), b.uint(7)})},
                                     {"default_alg", b.str("ES256")},
                                     {"max_message_bytes", b.uint(1024)}}));
       },
       "result.supported_algs[1]: must be str"},
      {"capabilities protocol above uint32", Method::kCapabilities,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.params({{"protocol", b.uint(1ULL << 33U)}}));
       },
       "result.protocol: out of range"},
      {"health latency as str", Method::kHealth,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"ok", b.boolean(true)},
                                     {"latency_ms", b.str("1")},
                                     {"error", b.nil()},
                                     {"token", token(b)}}));
       },
       "result.latency_ms: must be float"},
      {"health error as bool", Method::kHealth,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"ok", b.boolean(true)},
                                     {"latency_ms", b.float64(1.5)},
                                     {"error", b.boolean(false)},
                                     {"token", token(b)}}));
       },
       "result.error: must be str"},
      {"health token without serial", Method::kHealth,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"ok", b.boolean(true)},
                                     {"latency_ms", b.float64(1.5)},
                                     {"error", b.nil()},
                                     {"token", b.params({{"label", b.str("t")},
                                                         {"manufacturer", b.str("m")},
                                                         {"model", b.str("x")}})}}));
       },
       "result.token: missing 'serial'"},
      {"jwk value not str", Method::kGetPublicKey,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(),
                           b.params({{"kid", b.str("k")},
                                     {"alg", b.str("ES256")},
                                     {"jwk", b.params({{"kty", b.str("EC")}, {"x", b.bin("x")}})},
                                     {"spki", b.bin("der")}}));
       },
       "result.jwk.x: must be str, not bin"},
      {"list_keys entry without jwk", Method::kListKeys,
       [](ObjectBuilder& b) {
         return b.response(
             1, b.nil(),
             b.params(
                 {{"keys",
                   b.array(
                       {b.params({{"kid", b.str("a")}, {"alg", b.str("ES256")}, {"jwk", jwk(b)}}),
                        b.params({{"kid", b.str("b")}, {"alg", b.str("ES256")}})})}}));
       },
       "result.keys[1]: missing 'jwk'"},
      {"get_jwks keys not an array", Method::kGetJwks,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.params({{"keys", jwk(b)}}));
       },
       "result.keys: must be array, not map"},
      {"sign_batch item with both", Method::kSignBatch,
       [](ObjectBuilder& b) {
         return b.response(
             1, b.nil(),
             b.params({{"results",
                        b.array({b.params({{"signature", b.bin("s")},
                                           {"error", b.params({{"code", b.str("internal")},
                                                               {"message", b.str("m")}})}})})}}));
       },
       "result.results[0]: must hold exactly one of"},
      {"sign_batch item with neither", Method::kSignBatch,
       [](ObjectBuilder& b) {
         return b.response(1, b.nil(), b.params({{"results", b.array({b.params({})})}}));
       },
       "result.results[0]: must hold exactly one of"},
      {"sign_batch item error malformed", Method::kSignBatch,
       [](ObjectBuilder& b) {
         return b.response(
             1, b.nil(),
             b.params({{"results",
                        b.array({b.params({{"signature", b.bin("s")}}),
                                 b.params({{"error", b.params({{"code", b.str("x")}})}})})}}));
       },
       "result.results[1].error: missing 'message'"},
      {"import_key has no result", Method::kImportKey,
       [](ObjectBuilder& b) { return b.response(1, b.nil(), b.params({})); }, "no result"},
  };
  for (const BadResponse& c : cases) {
    DYNAMIC_SECTION(c.name) {
      ObjectBuilder b;
      const Object built = c.build(b);
      try {
        const Response response = decode_response(built, c.method);
        FAIL("decoded without error, msgid " << response.msgid);
      } catch (const ProtocolError& e) {
        CHECK_THAT(e.what(), Catch::Contains(c.message_part));
      }
    }
  }
}

TEST_CASE("decode_response is lenient where the protocol may grow", "[decode_response]") {
  ObjectBuilder b;
  SECTION("unknown result keys are ignored") {
    const Response r = decode_response(
        b.response(3, b.nil(), b.params({{"valid", b.boolean(true)}, {"extra", b.uint(1)}})),
        Method::kVerify);
    CHECK(r.msgid == 3);
    CHECK(std::get<VerifyResult>(std::get<Result>(r.body)).valid);
  }
  SECTION("an unknown error code is kept as internal, naming the code") {
    const Response r = decode_response(
        b.response(4, b.params({{"code", b.str("rate_limited")}, {"message", b.str("slow down")}}),
                   b.nil()),
        Method::kSign);
    const Error& error = std::get<Error>(r.body);
    CHECK(error.code == ErrorCode::kInternal);
    CHECK_THAT(error.message, Catch::Contains("rate_limited") && Catch::Contains("slow down"));
  }
  SECTION("a nil ckr is no ckr, and latency_ms may arrive as an integer") {
    const Response r = decode_response(
        b.response(
            5, b.params({{"code", b.str("hsm_error")}, {"message", b.str("m")}, {"ckr", b.nil()}}),
            b.nil()),
        Method::kSign);
    CHECK_FALSE(std::get<Error>(r.body).ckr.has_value());
    const Response health = decode_response(b.response(6, b.nil(),
                                                       b.params({{"ok", b.boolean(true)},
                                                                 {"latency_ms", b.uint(3)},
                                                                 {"error", b.nil()},
                                                                 {"token", token(b)}})),
                                            Method::kHealth);
    CHECK(std::get<HealthResult>(std::get<Result>(health.body)).latency_ms == 3.0);
  }
  SECTION("capabilities: metrics_url is optional (older agents) and may be nil") {
    // The ninth key is metrics_url, or another key an older or later agent might send.
    const auto url_of = [&b](std::string_view key, Object value) {
      const Object result = b.params({{"protocol", b.uint(1)},
                                      {"agent_version", b.str("v")},
                                      {"can_create", b.boolean(true)},
                                      {"can_import", b.boolean(false)},
                                      {"can_delete", b.boolean(true)},
                                      {"supported_algs", b.array({b.str("ES256")})},
                                      {"default_alg", b.str("ES256")},
                                      {"max_message_bytes", b.uint(1024)},
                                      {key, value}});
      const Response r = decode_response(b.response(7, b.nil(), result), Method::kCapabilities);
      return std::get<CapabilitiesResult>(std::get<Result>(r.body)).metrics_url;
    };
    CHECK_FALSE(url_of("later_key", b.str("x")).has_value());
    CHECK_FALSE(url_of("metrics_url", b.nil()).has_value());
    CHECK(url_of("metrics_url", b.str("http://127.0.0.1:9464/metrics")) ==
          std::optional<std::string>("http://127.0.0.1:9464/metrics"));
    CHECK_THROWS_WITH(url_of("metrics_url", b.uint(9464)),
                      Catch::Contains("result.metrics_url: must be str"));
  }
}
