// Every protocol method, end to end: client library -> socket -> real agent -> SoftHSMv2, with
// every signature checked by OpenSSL against the public key the agent returned.
#include <algorithm>
#include <catch2/catch.hpp>

#include "integration/running_agent.hpp"

using namespace hsm::test;

TEST_CASE("capabilities describe the agent and its limits", "[methods]") {
  RunningAgent env;
  const auto caps = env.client.capabilities();
  CHECK(caps.protocol == 1);
  CHECK_FALSE(caps.agent_version.empty());
  CHECK(caps.can_create);
  CHECK_FALSE(caps.can_import);
  CHECK(caps.can_delete);
  CHECK(caps.default_alg == "ES256");
  CHECK(std::find(caps.supported_algs.begin(), caps.supported_algs.end(), "ES256") !=
        caps.supported_algs.end());
  CHECK(caps.max_message_bytes == 1024 * 1024);
}

TEST_CASE("health touches the token and describes it", "[methods]") {
  RunningAgent env;
  const auto health = env.client.health();
  CHECK(health.ok);
  CHECK_FALSE(health.error.has_value());
  CHECK(health.latency_ms > 0.0);
  CHECK(health.token.label == env.token.label());
  CHECK(health.token.manufacturer.find("SoftHSM") != std::string::npos);
  CHECK_FALSE(health.token.serial.empty());
}

TEST_CASE("generate, sign, verify, export, list and delete an ES256 key", "[methods]") {
  RunningAgent env;
  const auto key = env.client.generate_key("jwt-signer", "ES256");
  CHECK(key.kid == "jwt-signer");
  CHECK(key.alg == "ES256");
  CHECK(key.jwk.at("kty") == "EC");
  CHECK(key.jwk.at("crv") == "P-256");
  CHECK(key.jwk.at("kid") == "jwt-signer");
  CHECK(key.jwk.at("alg") == "ES256");
  CHECK(key.jwk.at("use") == "sig");
  CHECK(base64url_decode(key.jwk.at("x")).size() == 32);
  CHECK(base64url_decode(key.jwk.at("y")).size() == 32);
  CHECK(key.jwk.count("d") == 0);

  const auto pub = env.client.get_public_key("jwt-signer");
  CHECK(pub.jwk == key.jwk);
  CHECK(pub.spki == spki_from_jwk(pub.jwk));

  const auto data = to_bytes("header.payload");
  const auto signature = env.client.sign("jwt-signer", data);
  REQUIRE(signature.size() == 64);
  CHECK(verify_with_spki(pub.spki, "ES256", data, signature));
  CHECK(verify_with_jwk(pub.jwk, "ES256", data, signature));
  CHECK_FALSE(verify_with_spki(pub.spki, "ES256", to_bytes("other"), signature));

  SECTION("a digest signs the same message") {
    const auto by_digest = env.client.sign_digest("jwt-signer", sha256(data));
    REQUIRE(by_digest.size() == 64);
    CHECK(verify_with_spki(pub.spki, "ES256", data, by_digest));
  }
  SECTION("string_view overload signs the bytes of the string") {
    const auto sig = env.client.sign("jwt-signer", std::string_view("header.payload"));
    CHECK(verify_with_spki(pub.spki, "ES256", data, sig));
  }
  SECTION("verify accepts a good signature and rejects a bad one without an error") {
    CHECK(env.client.verify("jwt-signer", data, signature));
    auto tampered = signature;
    tampered[10] ^= 0x01;
    CHECK_FALSE(env.client.verify("jwt-signer", data, tampered));
    CHECK_FALSE(env.client.verify("jwt-signer", to_bytes("other"), signature));
    CHECK(env.client.verify_digest("jwt-signer", sha256(data), signature));
  }
  SECTION("list and delete") {
    env.client.generate_key("a-first");
    const auto keys = env.client.list_keys();
    REQUIRE(keys.size() == 2);
    CHECK(keys[0].kid == "a-first");  // sorted by kid
    CHECK(keys[1].kid == "jwt-signer");
    CHECK(keys[1].jwk == key.jwk);
    CHECK(env.client.delete_key("jwt-signer"));
    CHECK_FALSE(env.client.delete_key("jwt-signer"));
    CHECK(env.client.list_keys().size() == 1);
    try {
      (void)env.client.sign("jwt-signer", data);
      FAIL("sign with a deleted key succeeded");
    } catch (const hsm::Error& e) {
      CHECK(e.code() == "not_found");
    }
  }
}

TEST_CASE("a kid that exists already is refused, never duplicated", "[methods]") {
  RunningAgent env;
  env.client.generate_key("dup");
  try {
    env.client.generate_key("dup");
    FAIL("second generate_key succeeded");
  } catch (const hsm::Error& e) {
    CHECK(e.code() == "already_exists");
  }
  CHECK(env.client.list_keys().size() == 1);
}

TEST_CASE("the key survives an agent restart (token objects)", "[methods]") {
  SoftHsmToken token;
  hsm::Bytes spki;
  {
    AgentProcess agent(token);
    hsm::Client client(agent.socket_path());
    client.generate_key("persistent");
    spki = client.get_public_key("persistent").spki;
    CHECK(agent.stop().code == 0);
  }
  AgentProcess agent(token);
  hsm::Client client(agent.socket_path());
  const auto data = to_bytes("after restart");
  CHECK(verify_with_spki(spki, "ES256", data, client.sign("persistent", data)));
}

TEST_CASE("read-only agent refuses to create or delete keys", "[methods]") {
  SoftHsmToken token;
  {
    AgentProcess writer(token);
    hsm::Client(writer.socket_path()).generate_key("existing");
  }
  AgentProcess agent(token, AgentOptions{.extra_args = {"--read-only"}});
  hsm::Client client(agent.socket_path());
  const auto caps = client.capabilities();
  CHECK_FALSE(caps.can_create);
  CHECK_FALSE(caps.can_delete);
  for (auto attempt : {0, 1}) {
    try {
      if (attempt == 0) {
        client.generate_key("new");
      } else {
        client.delete_key("existing");
      }
      FAIL("a read-only agent changed the token");
    } catch (const hsm::Error& e) {
      CHECK(e.code() == "permission_denied");
    }
  }
  const auto data = to_bytes("still signs");
  CHECK(verify_with_spki(client.get_public_key("existing").spki, "ES256", data,
                         client.sign("existing", data)));
}
