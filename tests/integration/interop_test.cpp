// Interoperability with the world outside this codebase: OpenSC's pkcs11-tool (keys made by
// others are usable; keys made by the agent are sensitive and never extractable) and a
// third-party client written only from protocol/README.md, verifying with a standard JOSE
// library (Python msgpack + jwcrypto).
#include <array>
#include <catch2/catch.hpp>
#include <cstdio>

#include "fixtures/command.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;

namespace {

std::string pkcs11_tool(const SoftHsmToken& token, const std::string& args) {
  const auto result =
      run_command("SOFTHSM2_CONF='" + token.config_path().string() + "' pkcs11-tool --module " +
                  kSoftHsmModule + " --token-label '" + token.label() + "' --login --pin '" +
                  token.user_pin() + "' " + args);
  INFO(result.output);
  REQUIRE(result.status == 0);
  return result.output;
}

}  // namespace

TEST_CASE("a P-256 key made by pkcs11-tool is usable by its label", "[interop]") {
  SoftHsmToken token;
  pkcs11_tool(token, "--keypairgen --key-type EC:prime256v1 --label external-key --id 0a0b");
  AgentProcess agent(token);
  hsm::Client client(agent.socket_path());
  const auto pub = client.get_public_key("external-key");
  CHECK(pub.alg == "ES256");
  CHECK(pub.jwk.at("crv") == "P-256");
  const auto data = to_bytes("signed by a key the agent did not make");
  const auto signature = client.sign("external-key", data);
  CHECK(verify_with_spki(pub.spki, "ES256", data, signature));
  CHECK(verify_with_jwk(pub.jwk, "ES256", data, signature));
  const auto keys = client.list_keys();
  REQUIRE(keys.size() == 1);
  CHECK(keys[0].kid == "external-key");
}

TEST_CASE("keys made by the agent are sensitive and never extractable", "[interop]") {
  RunningAgent env;
  env.client.generate_key("inside-only");
  const auto listing = pkcs11_tool(env.token, "--list-objects --type privkey");
  INFO(listing);
  CHECK(listing.find("inside-only") != std::string::npos);
  CHECK(listing.find("sensitive") != std::string::npos);
  CHECK(listing.find("never extractable") != std::string::npos);
  // The public object carries the same label and id.
  const auto publics = pkcs11_tool(env.token, "--list-objects --type pubkey");
  CHECK(publics.find("inside-only") != std::string::npos);
}

TEST_CASE("a third-party client from protocol/README.md verifies a JWS with jwcrypto",
          "[interop]") {
  RunningAgent env;
  const auto result = run_command("/usr/bin/python3 '" HSM_SOURCE_DIR
                                  "/tests/integration/third_party_client.py' '" +
                                  env.agent.socket_path() + "'");
  INFO(result.output);
  CHECK(result.status == 0);
  CHECK(result.output.find("jws verified") != std::string::npos);
}
