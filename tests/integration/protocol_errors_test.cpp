// The wire contract under bad input, through raw sockets: every error code reachable without
// fault injection, malformed shapes answered (connection kept), garbage and oversized messages
// closing only the offending connection.
#include <catch2/catch.hpp>
#include <thread>

#include "integration/running_agent.hpp"

using namespace hsm::test;
using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using namespace std::chrono_literals;

namespace {

// Packs an arbitrary message with msgpack's packer, for shapes the codec would never produce.
template <typename F>
std::string pack(F&& fill) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> packer(buffer);
  fill(packer);
  return {buffer.data(), buffer.size()};
}

std::string request(std::uint32_t msgid, std::string_view method,
                    const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& params_map) {
  return pack([&](auto& p) {
    p.pack_array(4);
    p.pack_uint8(0);
    p.pack_uint32(msgid);
    p.pack(std::string(method));
    p.pack_array(1);
    params_map(p);
  });
}

// The start of a hand-written sign parameter map of `fields` entries: kid "k1", data "x".
template <typename Packer>
void pack_kid_and_data(Packer& p, std::uint32_t fields) {
  p.pack_map(fields);
  p.pack(std::string("kid"));
  p.pack(std::string("k1"));
  p.pack(std::string("data"));
  p.pack_bin(1);
  p.pack_bin_body("x", 1);
}

hsm::protocol::Error expect_error(RawConnection& conn, Method method, std::uint32_t msgid) {
  auto response = conn.receive_response(method);
  REQUIRE(response.has_value());
  CHECK(response->msgid == msgid);
  REQUIRE(std::holds_alternative<hsm::protocol::Error>(response->body));
  return std::get<hsm::protocol::Error>(response->body);
}

hsm::protocol::Request sign_request(std::uint32_t msgid, std::string kid, hsm::Bytes data) {
  hsm::protocol::SignParams params;
  params.kid = std::move(kid);
  params.input = hsm::protocol::Data{std::move(data)};
  return {msgid, Method::kSign, params, std::nullopt};
}

}  // namespace

TEST_CASE("error codes reachable with a healthy token", "[protocol]") {
  RunningAgent env;
  env.client.generate_key("k1");
  auto conn = env.connect();

  SECTION("unknown_method keeps the connection") {
    conn.send(request(7, "launch_missiles", [](auto& p) { p.pack_map(0); }));
    auto response = conn.receive();
    REQUIRE(response);
    const auto& obj = response->get();
    REQUIRE(obj.type == msgpack::type::ARRAY);
    CHECK(obj.via.array.ptr[1].as<std::uint32_t>() == 7);
    const auto error = obj.via.array.ptr[2].as<std::map<std::string, std::string>>();
    CHECK(error.at("code") == "unknown_method");
    // The connection is still usable.
    conn.send(sign_request(8, "k1", to_bytes("x")));
    auto ok = conn.receive_response(Method::kSign);
    REQUIRE(ok);
    CHECK(std::holds_alternative<hsm::protocol::Result>(ok->body));
  }
  SECTION("invalid_params: unknown parameter") {
    conn.send(request(1, "sign", [](auto& p) {
      pack_kid_and_data(p, 3);
      p.pack(std::string("colour"));
      p.pack(std::string("blue"));
    }));
    const auto error = expect_error(conn, Method::kSign, 1);
    CHECK(error.code == ErrorCode::kInvalidParams);
    CHECK(error.message.find("colour") != std::string::npos);
  }
  SECTION("invalid_params: both data and digest") {
    // SignInput cannot hold both, so the message is written by hand.
    const auto digest = sha256(to_bytes("x"));
    conn.send(request(2, "sign", [&](auto& p) {
      pack_kid_and_data(p, 3);
      p.pack(std::string("digest"));
      p.pack_bin(static_cast<std::uint32_t>(digest.size()));
      p.pack_bin_body(reinterpret_cast<const char*>(digest.data()),
                      static_cast<std::uint32_t>(digest.size()));
    }));
    const auto error = expect_error(conn, Method::kSign, 2);
    CHECK(error.code == ErrorCode::kInvalidParams);
    CHECK(error.message.find("exactly one of 'data' and 'digest'") != std::string::npos);
  }
  SECTION("invalid_params: a digest of the wrong length") {
    hsm::protocol::SignParams params;
    params.kid = "k1";
    params.input = hsm::protocol::Digest{hsm::Bytes(20, 0xAB)};
    conn.send(hsm::protocol::Request{3, Method::kSign, params, std::nullopt});
    CHECK(expect_error(conn, Method::kSign, 3).code == ErrorCode::kInvalidParams);
  }
  SECTION("invalid_params: kid too long, empty, or with NUL") {
    for (const std::string& kid : {std::string(256, 'k'), std::string(), std::string("a\0b", 3)}) {
      conn.send(sign_request(4, kid, to_bytes("x")));
      CHECK(expect_error(conn, Method::kSign, 4).code == ErrorCode::kInvalidParams);
    }
  }
  SECTION("invalid_request: msgpack of the wrong shape with a readable msgid") {
    conn.send(pack([](auto& p) {
      p.pack_array(4);
      p.pack_uint8(0);
      p.pack_uint32(5);
      p.pack(std::string("sign"));
      p.pack_map(0);  // params must be an array holding one map
    }));
    const auto response = conn.receive();
    REQUIRE(response);
    const auto error = response->get().via.array.ptr[2].as<std::map<std::string, std::string>>();
    CHECK((error.at("code") == "invalid_request" || error.at("code") == "invalid_params"));
  }
  SECTION("not_found") {
    conn.send(sign_request(6, "no-such-key", to_bytes("x")));
    CHECK(expect_error(conn, Method::kSign, 6).code == ErrorCode::kNotFound);
  }
  SECTION("unsupported_alg") {
    hsm::protocol::SignParams params;
    params.kid = "k1";
    params.input = hsm::protocol::Data{to_bytes("x")};
    params.alg = "HS256";
    conn.send(hsm::protocol::Request{9, Method::kSign, params, std::nullopt});
    CHECK(expect_error(conn, Method::kSign, 9).code == ErrorCode::kUnsupportedAlg);
    hsm::protocol::GenerateKeyParams gen{"k2", std::string("none"), std::nullopt};
    conn.send(hsm::protocol::Request{10, Method::kGenerateKey, gen, std::nullopt});
    CHECK(expect_error(conn, Method::kGenerateKey, 10).code == ErrorCode::kUnsupportedAlg);
  }
  SECTION("already_exists") {
    hsm::protocol::GenerateKeyParams gen{"k1", std::nullopt, std::nullopt};
    conn.send(hsm::protocol::Request{11, Method::kGenerateKey, gen, std::nullopt});
    CHECK(expect_error(conn, Method::kGenerateKey, 11).code == ErrorCode::kAlreadyExists);
  }
  SECTION("not_supported: import_key") {
    conn.send(request(12, "import_key", [](auto& p) {
      p.pack_map(1);
      p.pack(std::string("kid"));
      p.pack(std::string("imported"));
    }));
    CHECK(expect_error(conn, Method::kImportKey, 12).code == ErrorCode::kNotSupported);
  }
}

TEST_CASE("overloaded when the queue is full", "[protocol]") {
  // One session and a queue of one: a burst of pipelined signs must overflow it.
  RunningAgent env(
      AgentOptions{.extra_args = {"--sessions", "1", "--max-sessions", "1", "--max-queue", "1"}});
  env.client.generate_key("k");
  auto conn = env.connect();
  std::string burst;
  for (std::uint32_t id = 0; id < 200; ++id) {
    msgpack::sbuffer buffer;
    hsm::protocol::encode_request(sign_request(id, "k", to_bytes("x")), buffer);
    burst.append(buffer.data(), buffer.size());
  }
  REQUIRE(conn.send(burst));
  int ok = 0, overloaded = 0;
  for (int i = 0; i < 200; ++i) {
    auto response = conn.receive_response(Method::kSign);
    REQUIRE(response);
    if (std::holds_alternative<hsm::protocol::Result>(response->body)) {
      ++ok;
    } else if (std::get<hsm::protocol::Error>(response->body).code == ErrorCode::kOverloaded) {
      ++overloaded;
    }
  }
  CHECK(ok >= 1);
  CHECK(overloaded >= 1);
  CHECK(ok + overloaded == 200);
}

TEST_CASE("garbage bytes close that connection only", "[protocol]") {
  RunningAgent env;
  env.client.generate_key("k");
  auto bystander = env.connect();
  auto attacker = env.connect();
  // 0xc1 is never valid MessagePack.
  attacker.send(std::string("\xc1\xc1\xc1 not msgpack at all", 22));
  CHECK(attacker.closed_by_peer());
  bystander.send(sign_request(1, "k", to_bytes("still here")));
  auto response = bystander.receive_response(Method::kSign);
  REQUIRE(response);
  CHECK(std::holds_alternative<hsm::protocol::Result>(response->body));
  CHECK(env.client.health().ok);
}

TEST_CASE("a message over the size limit closes the connection without buffering it",
          "[protocol]") {
  RunningAgent env(AgentOptions{.extra_args = {"--max-message-bytes", "4096"}});
  env.client.generate_key("k");
  CHECK(env.client.capabilities().max_message_bytes == 4096);
  auto conn = env.connect();
  msgpack::sbuffer buffer;
  hsm::protocol::encode_request(sign_request(1, "k", hsm::Bytes(8192, 0x55)), buffer);
  conn.send(std::string_view(buffer.data(), buffer.size()));
  CHECK(conn.closed_by_peer());
  // Others are unaffected.
  const auto data = to_bytes("small");
  CHECK(env.client.sign("k", data).size() == 64);
}

TEST_CASE("a message without a readable msgid closes the connection", "[protocol]") {
  RunningAgent env;
  auto conn = env.connect();
  conn.send(pack([](auto& p) { p.pack(std::string("hello")); }));
  CHECK(conn.closed_by_peer());
  CHECK(env.client.health().ok);
}
