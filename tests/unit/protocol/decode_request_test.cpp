// decode_request: every malformed shape and every bad parameter gets the right error code, the
// msgid when it is known, and a message naming the problem.
#include <catch2/catch.hpp>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "hsm/protocol/codec.hpp"
#include "object_builder.hpp"

using namespace hsm::protocol;
using hsm::protocol::test::ObjectBuilder;
using Object = msgpack::object;

namespace {

struct BadRequest {
  std::string name;
  std::function<Object(ObjectBuilder&)> build;
  ErrorCode code;
  std::optional<std::uint32_t> msgid;
  std::string message_part;  // the error message must contain this
};

void check_rejected(const std::vector<BadRequest>& cases) {
  for (const BadRequest& c : cases) {
    DYNAMIC_SECTION(c.name) {
      ObjectBuilder b;
      const Object built = c.build(b);
      // Decode both the hand-built object and what a peer would receive after packing it.
      const auto packed = hsm::protocol::test::through_wire(built);
      for (const Object* msg : {&built, &packed.get()}) {
        const auto decoded = decode_request(*msg);
        REQUIRE(std::holds_alternative<RequestDecodeError>(decoded));
        const auto& error = std::get<RequestDecodeError>(decoded);
        INFO("message: " << error.error.message);
        CHECK(error.error.code == c.code);
        CHECK(error.msgid == c.msgid);
        CHECK_THAT(error.error.message, Catch::Contains(c.message_part));
        CHECK_FALSE(error.error.ckr.has_value());
      }
    }
  }
}

Request decode_ok(const Object& msg) {
  auto decoded = decode_request(msg);
  if (const auto* error = std::get_if<RequestDecodeError>(&decoded)) {
    FAIL("unexpected error: " << error->error.message);
  }
  return std::get<Request>(decoded);
}

constexpr auto kInvalidRequest = ErrorCode::kInvalidRequest;
constexpr auto kInvalidParams = ErrorCode::kInvalidParams;

}  // namespace

TEST_CASE("messages that are not msgpack-rpc requests have no msgid", "[decode_request]") {
  check_rejected({
      {"an integer", [](ObjectBuilder& b) { return b.uint(7); }, kInvalidRequest, std::nullopt,
       "array"},
      {"a map",
       [](ObjectBuilder& b) {
         return b.params({{"kid", b.str("k")}});
       },
       kInvalidRequest, std::nullopt, "array"},
      {"a str", [](ObjectBuilder& b) { return b.str("sign"); }, kInvalidRequest, std::nullopt,
       "array"},
      {"nil", [](ObjectBuilder& b) { return b.nil(); }, kInvalidRequest, std::nullopt, "array"},
      {"empty array", [](ObjectBuilder& b) { return b.array({}); }, kInvalidRequest, std::nullopt,
       "array"},
      {"array of one", [](ObjectBuilder& b) { return b.array({b.uint(0)}); }, kInvalidRequest,
       std::nullopt, "array"},
      {"response tag",
       [](ObjectBuilder& b) {
         return b.array({b.uint(1), b.uint(5), b.str("sign"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "first element"},
      {"notification tag",
       [](ObjectBuilder& b) {
         return b.array({b.uint(2), b.str("sign"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "first element"},
      {"negative tag",
       [](ObjectBuilder& b) {
         return b.array({b.sint(-1), b.uint(5), b.str("sign"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "first element"},
      {"tag as str",
       [](ObjectBuilder& b) {
         return b.array({b.str("0"), b.uint(5), b.str("sign"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "first element"},
      {"negative msgid",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.sint(-5), b.str("health"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "msgid"},
      {"msgid above uint32",
       [](ObjectBuilder& b) {
         return b.array(
             {b.uint(0), b.uint(4294967296ULL), b.str("health"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "msgid"},
      {"msgid as str",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.str("5"), b.str("health"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "msgid"},
      {"msgid as float",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.float64(5.5), b.str("health"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "msgid"},
      {"msgid nil",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.nil(), b.str("health"), b.array({b.params({})})});
       },
       kInvalidRequest, std::nullopt, "msgid"},
  });
}

TEST_CASE("requests of the wrong shape are invalid_request with their msgid", "[decode_request]") {
  check_rejected({
      {"three elements",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health")});
       },
       kInvalidRequest, 9, "4 elements"},
      {"five elements",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health"), b.array({b.params({})}), b.nil()});
       },
       kInvalidRequest, 9, "4 elements"},
      {"method as int",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.uint(4), b.array({b.params({})})});
       },
       kInvalidRequest, 9, "method must be str"},
      {"method as bin",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.bin("sign"), b.array({b.params({})})});
       },
       kInvalidRequest, 9, "method must be str"},
      {"params is a map, not an array",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health"), b.params({})});
       },
       kInvalidRequest, 9, "params"},
      {"params nil",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health"), b.nil()});
       },
       kInvalidRequest, 9, "params"},
      {"params array of 0",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health"), b.array({})});
       },
       kInvalidRequest, 9, "params"},
      {"params array of 2",
       [](ObjectBuilder& b) {
         return b.array(
             {b.uint(0), b.uint(9), b.str("health"), b.array({b.params({}), b.params({})})});
       },
       kInvalidRequest, 9, "params"},
      {"params [nil]",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(9), b.str("health"), b.array({b.nil()})});
       },
       kInvalidRequest, 9, "params"},
      {"params [array]",
       [](ObjectBuilder& b) {
         return b.array(
             {b.uint(0), b.uint(9), b.str("get_public_key"), b.array({b.array({b.str("k")})})});
       },
       kInvalidRequest, 9, "params"},
      {"msgid 0 is a valid msgid",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(0), b.str("health")});
       },
       kInvalidRequest, 0, "4 elements"},
      {"msgid max uint32",
       [](ObjectBuilder& b) {
         return b.array({b.uint(0), b.uint(4294967295ULL), b.str("health")});
       },
       kInvalidRequest, 4294967295U, "4 elements"},
  });
}

TEST_CASE("unknown methods are unknown_method", "[decode_request]") {
  check_rejected({
      {"made up", [](ObjectBuilder& b) { return b.request(3, "encrypt", b.params({})); },
       ErrorCode::kUnknownMethod, 3, "'encrypt'"},
      {"wrong case", [](ObjectBuilder& b) { return b.request(3, "Sign", b.params({})); },
       ErrorCode::kUnknownMethod, 3, "'Sign'"},
      {"empty", [](ObjectBuilder& b) { return b.request(3, "", b.params({})); },
       ErrorCode::kUnknownMethod, 3, "unknown method"},
      {"control bytes are not echoed",
       [](ObjectBuilder& b) { return b.request(3, "x\n\x01y", b.params({})); },
       ErrorCode::kUnknownMethod, 3, "'x??y'"},
  });
  ObjectBuilder b;
  const auto decoded = decode_request(b.request(3, "encrypt", b.params({})));
  CHECK_FALSE(std::get<RequestDecodeError>(decoded).method.has_value());
}

TEST_CASE("parameter names are checked per method", "[decode_request][params]") {
  check_rejected({
      {"unknown name",
       [](ObjectBuilder& b) {
         return b.request(
             4, "sign",
             b.params({{"kid", b.str("k")}, {"data", b.bin("x")}, {"colour", b.str("red")}}));
       },
       kInvalidParams, 4, "unknown parameter 'colour'"},
      {"name of another method",
       [](ObjectBuilder& b) {
         return b.request(
             4, "sign",
             b.params({{"kid", b.str("k")}, {"data", b.bin("x")}, {"rsa_bits", b.uint(2048)}}));
       },
       kInvalidParams, 4, "unknown parameter 'rsa_bits'"},
      {"signature is verify's, not sign's",
       [](ObjectBuilder& b) {
         return b.request(
             4, "sign",
             b.params({{"kid", b.str("k")}, {"data", b.bin("x")}, {"signature", b.bin("s")}}));
       },
       kInvalidParams, 4, "'signature'"},
      {"health takes no kid",
       [](ObjectBuilder& b) {
         return b.request(4, "health", b.params({{"kid", b.str("k")}}));
       },
       kInvalidParams, 4, "unknown parameter 'kid'"},
      {"capabilities takes nothing",
       [](ObjectBuilder& b) {
         return b.request(4, "capabilities", b.params({{"verbose", b.boolean(true)}}));
       },
       kInvalidParams, 4, "'verbose'"},
      {"list_keys takes nothing",
       [](ObjectBuilder& b) {
         return b.request(4, "list_keys", b.params({{"prefix", b.str("a")}}));
       },
       kInvalidParams, 4, "'prefix'"},
      {"get_jwks takes nothing",
       [](ObjectBuilder& b) {
         return b.request(4, "get_jwks", b.params({{"kid", b.str("a")}}));
       },
       kInvalidParams, 4, "'kid'"},
      {"non-str name",
       [](ObjectBuilder& b) {
         return b.request(4, "get_public_key",
                          b.map({{b.str("kid"), b.str("k")}, {b.uint(1), b.str("x")}}));
       },
       kInvalidParams, 4, "names must be str"},
      {"duplicate name",
       [](ObjectBuilder& b) {
         return b.request(4, "get_public_key",
                          b.params({{"kid", b.str("a")}, {"kid", b.str("b")}}));
       },
       kInvalidParams, 4, "'kid' appears twice"},
      {"name is case sensitive",
       [](ObjectBuilder& b) {
         return b.request(4, "delete_key", b.params({{"KID", b.str("a")}}));
       },
       kInvalidParams, 4, "unknown parameter 'KID'"},
      {"method is named in the message",
       [](ObjectBuilder& b) {
         return b.request(4, "delete_key", b.params({{"x", b.str("a")}}));
       },
       kInvalidParams, 4, "delete_key:"},
  });
}

TEST_CASE("required parameters must be present", "[decode_request][params]") {
  check_rejected({
      {"get_public_key without kid",
       [](ObjectBuilder& b) { return b.request(5, "get_public_key", b.params({})); },
       kInvalidParams, 5, "missing parameter 'kid'"},
      {"delete_key without kid",
       [](ObjectBuilder& b) { return b.request(5, "delete_key", b.params({})); }, kInvalidParams, 5,
       "missing parameter 'kid'"},
      {"generate_key without kid",
       [](ObjectBuilder& b) {
         return b.request(5, "generate_key", b.params({{"alg", b.str("ES256")}}));
       },
       kInvalidParams, 5, "missing parameter 'kid'"},
      {"sign without kid",
       [](ObjectBuilder& b) {
         return b.request(5, "sign", b.params({{"data", b.bin("x")}}));
       },
       kInvalidParams, 5, "missing parameter 'kid'"},
      {"verify without signature",
       [](ObjectBuilder& b) {
         return b.request(5, "verify", b.params({{"kid", b.str("k")}, {"data", b.bin("x")}}));
       },
       kInvalidParams, 5, "missing parameter 'signature'"},
      {"sign_batch without items",
       [](ObjectBuilder& b) { return b.request(5, "sign_batch", b.params({})); }, kInvalidParams, 5,
       "missing parameter 'items'"},
  });
}

TEST_CASE("parameters of the wrong type are invalid_params naming the parameter",
          "[decode_request][params]") {
  const auto sign_with = [](std::string_view name, auto make_value) {
    return [name, make_value](ObjectBuilder& b) {
      // A valid sign request, with `name` replaced (or added) with a bad value.
      Object kid = b.str("k");
      Object data = b.bin("x");
      if (name == "kid") {
        kid = make_value(b);
        return b.request(6, "sign", b.params({{"kid", kid}, {"data", data}}));
      }
      if (name == "data") {
        return b.request(6, "sign", b.params({{"kid", kid}, {"data", make_value(b)}}));
      }
      if (name == "digest") {
        return b.request(6, "sign", b.params({{"kid", kid}, {"digest", make_value(b)}}));
      }
      return b.request(6, "sign", b.params({{"kid", kid}, {"data", data}, {name, make_value(b)}}));
    };
  };
  check_rejected({
      {"kid as uint", sign_with("kid", [](ObjectBuilder& b) { return b.uint(1); }), kInvalidParams,
       6, "parameter 'kid' must be str, not uint"},
      {"kid as bin", sign_with("kid", [](ObjectBuilder& b) { return b.bin("k"); }), kInvalidParams,
       6, "parameter 'kid' must be str, not bin"},
      {"kid nil", sign_with("kid", [](ObjectBuilder& b) { return b.nil(); }), kInvalidParams, 6,
       "parameter 'kid' must be str"},
      {"data as str", sign_with("data", [](ObjectBuilder& b) { return b.str("x"); }),
       kInvalidParams, 6, "parameter 'data' must be bin, not str"},
      {"data as array", sign_with("data", [](ObjectBuilder& b) { return b.array({b.uint(1)}); }),
       kInvalidParams, 6, "parameter 'data' must be bin, not array"},
      {"digest as str", sign_with("digest", [](ObjectBuilder& b) { return b.str("x"); }),
       kInvalidParams, 6, "parameter 'digest' must be bin"},
      {"alg as bin", sign_with("alg", [](ObjectBuilder& b) { return b.bin("ES256"); }),
       kInvalidParams, 6, "parameter 'alg' must be str"},
      {"format as uint", sign_with("format", [](ObjectBuilder& b) { return b.uint(0); }),
       kInvalidParams, 6, "parameter 'format' must be str"},
      {"format pem", sign_with("format", [](ObjectBuilder& b) { return b.str("pem"); }),
       kInvalidParams, 6, "parameter 'format' must be \"raw\" or \"der\""},
      {"format upper case", sign_with("format", [](ObjectBuilder& b) { return b.str("DER"); }),
       kInvalidParams, 6, "'format'"},
      {"timeout_ms zero", sign_with("timeout_ms", [](ObjectBuilder& b) { return b.uint(0); }),
       kInvalidParams, 6, "parameter 'timeout_ms' must be an unsigned integer in 1.."},
      {"timeout_ms negative",
       sign_with("timeout_ms", [](ObjectBuilder& b) { return b.sint(-100); }), kInvalidParams, 6,
       "'timeout_ms'"},
      {"timeout_ms above uint32",
       sign_with("timeout_ms", [](ObjectBuilder& b) { return b.uint(4294967296ULL); }),
       kInvalidParams, 6, "'timeout_ms'"},
      {"timeout_ms as str", sign_with("timeout_ms", [](ObjectBuilder& b) { return b.str("10"); }),
       kInvalidParams, 6, "'timeout_ms' must be an unsigned integer in 1..4294967295, not str"},
      {"timeout_ms as float",
       sign_with("timeout_ms", [](ObjectBuilder& b) { return b.float64(10.5); }), kInvalidParams, 6,
       "'timeout_ms'"},
  });
  check_rejected({
      {"rsa_bits as str",
       [](ObjectBuilder& b) {
         return b.request(
             7, "generate_key",
             b.params({{"kid", b.str("k")}, {"alg", b.str("RS256")}, {"rsa_bits", b.str("2048")}}));
       },
       kInvalidParams, 7, "parameter 'rsa_bits' must be an unsigned integer"},
      {"rsa_bits negative",
       [](ObjectBuilder& b) {
         return b.request(7, "generate_key",
                          b.params({{"kid", b.str("k")}, {"rsa_bits", b.sint(-2048)}}));
       },
       kInvalidParams, 7, "'rsa_bits'"},
      {"rsa_bits above uint32",
       [](ObjectBuilder& b) {
         return b.request(7, "generate_key",
                          b.params({{"kid", b.str("k")}, {"rsa_bits", b.uint(1ULL << 40U)}}));
       },
       kInvalidParams, 7, "'rsa_bits'"},
      {"generate_key alg as uint",
       [](ObjectBuilder& b) {
         return b.request(7, "generate_key", b.params({{"kid", b.str("k")}, {"alg", b.uint(256)}}));
       },
       kInvalidParams, 7, "parameter 'alg' must be str"},
      {"verify signature as str",
       [](ObjectBuilder& b) {
         return b.request(
             7, "verify",
             b.params({{"kid", b.str("k")}, {"data", b.bin("x")}, {"signature", b.str("sig")}}));
       },
       kInvalidParams, 7, "parameter 'signature' must be bin, not str"},
      {"verify format",
       [](ObjectBuilder& b) {
         return b.request(7, "verify",
                          b.params({{"kid", b.str("k")},
                                    {"data", b.bin("x")},
                                    {"signature", b.bin("s")},
                                    {"format", b.str("jose")}}));
       },
       kInvalidParams, 7, "'format'"},
      {"get_public_key kid as array",
       [](ObjectBuilder& b) {
         return b.request(7, "get_public_key", b.params({{"kid", b.array({b.str("k")})}}));
       },
       kInvalidParams, 7, "parameter 'kid' must be str, not array"},
      {"health timeout_ms zero",
       [](ObjectBuilder& b) {
         return b.request(7, "health", b.params({{"timeout_ms", b.uint(0)}}));
       },
       kInvalidParams, 7, "'timeout_ms'"},
  });
}

TEST_CASE("sign and verify need exactly one of data and digest", "[decode_request][params]") {
  check_rejected({
      {"sign with both",
       [](ObjectBuilder& b) {
         return b.request(8, "sign",
                          b.params({{"kid", b.str("k")},
                                    {"data", b.bin("x")},
                                    {"digest", b.bin(std::string(32, 'd'))}}));
       },
       kInvalidParams, 8, "exactly one of 'data' and 'digest' is required (got both)"},
      {"sign with neither",
       [](ObjectBuilder& b) {
         return b.request(8, "sign", b.params({{"kid", b.str("k")}}));
       },
       kInvalidParams, 8, "(got neither)"},
      {"verify with both",
       [](ObjectBuilder& b) {
         return b.request(8, "verify",
                          b.params({{"kid", b.str("k")},
                                    {"data", b.bin("x")},
                                    {"digest", b.bin("y")},
                                    {"signature", b.bin("s")}}));
       },
       kInvalidParams, 8, "(got both)"},
      {"verify with neither",
       [](ObjectBuilder& b) {
         return b.request(8, "verify", b.params({{"kid", b.str("k")}, {"signature", b.bin("s")}}));
       },
       kInvalidParams, 8, "(got neither)"},
  });
}

TEST_CASE("kids are checked against the kid rules", "[decode_request][params][kid]") {
  const auto get_key = [](std::string kid) {
    return [kid](ObjectBuilder& b) {
      return b.request(9, "get_public_key", b.params({{"kid", b.str(kid)}}));
    };
  };
  check_rejected({
      {"empty", get_key(""), kInvalidParams, 9, "parameter 'kid' must not be empty"},
      {"256 bytes", get_key(std::string(256, 'k')), kInvalidParams, 9,
       "parameter 'kid' must be at most 255 bytes (got 256)"},
      {"NUL inside", get_key(std::string("ab\0cd", 5)), kInvalidParams, 9,
       "parameter 'kid' must not contain NUL"},
      {"invalid UTF-8", get_key("\xC3\x28"), kInvalidParams, 9,
       "parameter 'kid' must be valid UTF-8"},
      {"overlong UTF-8", get_key("\xC0\x80"), kInvalidParams, 9, "UTF-8"},
      {"surrogate", get_key("\xED\xB2\x80"), kInvalidParams, 9, "UTF-8"},
      {"in sign",
       [](ObjectBuilder& b) {
         return b.request(9, "sign", b.params({{"kid", b.str("")}, {"data", b.bin("x")}}));
       },
       kInvalidParams, 9, "'kid' must not be empty"},
      {"in generate_key",
       [](ObjectBuilder& b) {
         return b.request(9, "generate_key", b.params({{"kid", b.str(std::string(300, 'x'))}}));
       },
       kInvalidParams, 9, "255"},
      {"in delete_key",
       [](ObjectBuilder& b) {
         return b.request(9, "delete_key", b.params({{"kid", b.str("\xFF")}}));
       },
       kInvalidParams, 9, "UTF-8"},
  });

  ObjectBuilder b;
  const std::string longest(255, 'k');
  const Request ok = decode_ok(b.request(9, "get_public_key", b.params({{"kid", b.str(longest)}})));
  CHECK(std::get<KidParams>(ok.params).kid == longest);
  const Request utf8 = decode_ok(
      b.request(9, "delete_key", b.params({{"kid", b.str("cl\xC3\xA9-\xF0\x9F\x94\x91")}})));
  CHECK(std::get<KidParams>(utf8.params).kid == "cl\xC3\xA9-\xF0\x9F\x94\x91");
}

TEST_CASE("sign_batch items are checked one by one", "[decode_request][params][batch]") {
  const auto item = [](ObjectBuilder& b, std::string_view kid) {
    return b.params({{"kid", b.str(kid)}, {"data", b.bin("x")}});
  };
  const auto batch_of = [item](std::size_t count) {
    return [item, count](ObjectBuilder& b) {
      const std::vector<Object> items(count, item(b, "k"));
      return b.request(10, "sign_batch", b.params({{"items", b.array(std::span(items))}}));
    };
  };
  check_rejected({
      {"items not an array",
       [](ObjectBuilder& b) {
         return b.request(10, "sign_batch", b.params({{"items", b.params({})}}));
       },
       kInvalidParams, 10, "parameter 'items' must be array, not map"},
      {"empty batch", batch_of(0), kInvalidParams, 10,
       "parameter 'items' must hold 1..256 items (got 0)"},
      {"batch too large", batch_of(kMaxBatchItems + 1), kInvalidParams, 10, "(got 257)"},
      {"item not a map",
       [item](ObjectBuilder& b) {
         return b.request(10, "sign_batch",
                          b.params({{"items", b.array({item(b, "a"), b.str("b")})}}));
       },
       kInvalidParams, 10, "parameter 'items[1]' must be map, not str"},
      {"item with a bad kid",
       [item](ObjectBuilder& b) {
         return b.request(
             10, "sign_batch",
             b.params({{"items", b.array({item(b, "a"), item(b, "b"), item(b, "")})}}));
       },
       kInvalidParams, 10, "parameter 'items[2].kid' must not be empty"},
      {"item without kid",
       [](ObjectBuilder& b) {
         return b.request(10, "sign_batch",
                          b.params({{"items", b.array({b.params({{"data", b.bin("x")}})})}}));
       },
       kInvalidParams, 10, "missing parameter 'items[0].kid'"},
      {"item with both data and digest",
       [](ObjectBuilder& b) {
         return b.request(10, "sign_batch",
                          b.params({{"items", b.array({b.params({{"kid", b.str("k")},
                                                                 {"data", b.bin("x")},
                                                                 {"digest", b.bin("y")}})})}}));
       },
       kInvalidParams, 10, "(got both)"},
      {"item data as str",
       [](ObjectBuilder& b) {
         return b.request(
             10, "sign_batch",
             b.params(
                 {{"items", b.array({b.params({{"kid", b.str("k")}, {"data", b.str("x")}})})}}));
       },
       kInvalidParams, 10, "parameter 'items[0].data' must be bin, not str"},
      {"item with timeout_ms",
       [](ObjectBuilder& b) {
         return b.request(10, "sign_batch",
                          b.params({{"items", b.array({b.params({{"kid", b.str("k")},
                                                                 {"data", b.bin("x")},
                                                                 {"timeout_ms", b.uint(5)}})})}}));
       },
       kInvalidParams, 10, "unknown parameter 'items[0].timeout_ms'"},
      {"item with a bad format",
       [](ObjectBuilder& b) {
         return b.request(10, "sign_batch",
                          b.params({{"items", b.array({b.params({{"kid", b.str("k")},
                                                                 {"digest", b.bin("x")},
                                                                 {"format", b.str("p1363")}})})}}));
       },
       kInvalidParams, 10, "'items[0].format'"},
  });

  ObjectBuilder b;
  const std::vector<Object> full(kMaxBatchItems, item(b, "k"));
  const Request largest = decode_ok(
      b.request(10, "sign_batch",
                b.params({{"items", b.array(std::span(full))}, {"timeout_ms", b.uint(9)}})));
  CHECK(std::get<SignBatchParams>(largest.params).items.size() == kMaxBatchItems);
  CHECK(largest.timeout_ms == 9U);
}

TEST_CASE("well-formed requests decode into the method's params", "[decode_request]") {
  ObjectBuilder b;
  SECTION("methods without params take an empty map or timeout_ms alone") {
    for (const char* method : {"capabilities", "health", "list_keys", "get_jwks"}) {
      INFO(method);
      const Request plain = decode_ok(b.request(1, method, b.params({})));
      CHECK(plain.method == parse_method(method));
      CHECK(std::holds_alternative<EmptyParams>(plain.params));
      CHECK_FALSE(plain.timeout_ms.has_value());
      const Request timed = decode_ok(b.request(2, method, b.params({{"timeout_ms", b.uint(1)}})));
      CHECK(timed.timeout_ms == 1U);
    }
  }
  SECTION("import_key accepts any params map and is left to the agent") {
    const Request request = decode_ok(b.request(3, "import_key",
                                                b.map({{b.str("kid"), b.uint(5)},
                                                       {b.uint(1), b.nil()},
                                                       {b.str("pem"), b.str("...")},
                                                       {b.str("timeout_ms"), b.str("soon")}})));
    CHECK(request.method == Method::kImportKey);
    CHECK(std::holds_alternative<EmptyParams>(request.params));
  }
  SECTION("sign keeps every field") {
    const Request request = decode_ok(b.request(4, "sign",
                                                b.params({{"format", b.str("der")},
                                                          {"digest", b.bin(std::string(32, 'd'))},
                                                          {"alg", b.str("ES256")},
                                                          {"kid", b.str("k")},
                                                          {"timeout_ms", b.uint(4294967295ULL)}})));
    const auto& params = std::get<SignParams>(request.params);
    CHECK(request.msgid == 4);
    CHECK(params.kid == "k");
    CHECK(params.input == SignInput{Digest{Bytes(32, 'd')}});
    CHECK(params.alg == "ES256");
    CHECK(params.format == SignatureFormat::kDer);
    CHECK(request.timeout_ms == 4294967295U);
  }
  SECTION("empty data is data") {
    const Request request =
        decode_ok(b.request(5, "sign", b.params({{"kid", b.str("k")}, {"data", b.bin("")}})));
    CHECK(std::get<SignParams>(request.params).input == SignInput{Data{}});
  }
  SECTION("generate_key with rsa_bits") {
    const Request request = decode_ok(b.request(
        6, "generate_key",
        b.params({{"kid", b.str("r")}, {"alg", b.str("RS256")}, {"rsa_bits", b.uint(4096)}})));
    const auto& params = std::get<GenerateKeyParams>(request.params);
    CHECK(params.rsa_bits == 4096U);
    CHECK(params.alg == "RS256");
  }
  SECTION("a decode error for invalid params names the method") {
    const auto decoded = decode_request(b.request(7, "verify", b.params({{"kid", b.str("k")}})));
    const auto& error = std::get<RequestDecodeError>(decoded);
    CHECK(error.method == Method::kVerify);
    CHECK(error.error.code == ErrorCode::kInvalidParams);
  }
}
