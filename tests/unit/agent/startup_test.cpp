// Startup failures against a real SoftHSMv2 token: each is one clear StartupError, never a
// crash, never a retry of a wrong PIN, never the PIN in the message.
#include <catch2/catch.hpp>

#include "pkcs11/token.hpp"
#include "service_fixture.hpp"

using namespace hsm::agent;
namespace protocol = hsm::protocol;
using Bytes = hsm::protocol::Bytes;
using hsm::agent::test::config_for;
using hsm::test::SoftHsmToken;

namespace {

std::string startup_error(HsmConfig config, AgentMetrics& metrics) {
  try {
    auto service = KeyService::open(std::move(config), metrics);
    service->close();
  } catch (const StartupError& e) {
    return e.what();
  }
  FAIL("KeyService::open succeeded");
  return {};
}

double login_calls(AgentMetrics& metrics) {
  return metrics.pkcs11_calls_total.Add({{"function", "C_Login"}}).Value();
}

}  // namespace

TEST_CASE("a wrong PIN is a StartupError naming the CKR, tried exactly once", "[startup]") {
  SoftHsmToken token("startup-pin", "1234", "5678");
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config = config_for(token);
  config.pin = SecretString("98765");
  try {
    (void)KeyService::open(std::move(config), metrics);
    FAIL("opened with a wrong PIN");
  } catch (const pkcs11::PinRejectedError& e) {
    const std::string message = e.what();
    CHECK(message.find("wrong PIN") != std::string::npos);
    CHECK(message.find("CKR_PIN_INCORRECT") != std::string::npos);
    CHECK(message.find("startup-pin") != std::string::npos);
    CHECK(message.find("98765") == std::string::npos);
  }
  CHECK(login_calls(metrics) == 1);
  CHECK(metrics.logins_total.Add({{"result", "CKR_PIN_INCORRECT"}}).Value() == 1);

  // The right PIN still works: the failed attempt did not lock the token.
  prometheus::Registry registry2;
  AgentMetrics metrics2(registry2);
  auto service = KeyService::open(config_for(token), metrics2);
  CHECK(service->token().label == "startup-pin");
  CHECK(metrics2.logins_total.Add({{"result", "ok"}}).Value() == 1);
  service->close();
}

TEST_CASE("an unknown token label is a StartupError naming it and the tokens found", "[startup]") {
  SoftHsmToken token("present-token");
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config = config_for(token);
  config.token_label = "  missing-token  ";
  const std::string message = startup_error(std::move(config), metrics);
  CHECK(message.find("'missing-token'") != std::string::npos);
  CHECK(message.find("present-token") != std::string::npos);
  CHECK(message.find(token.user_pin()) == std::string::npos);
}

TEST_CASE("a label with blanks around it still finds the token", "[startup]") {
  SoftHsmToken token("padded");
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config = config_for(token);
  config.token_label = " padded ";
  auto service = KeyService::open(std::move(config), metrics);
  CHECK(service->token().label == "padded");
  service->close();
}

TEST_CASE("slot selection by index", "[startup]") {
  SoftHsmToken token("by-index");
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  {
    HsmConfig config = config_for(token);
    config.token_label.reset();
    config.slot_index = 0;
    auto service = KeyService::open(std::move(config), metrics);
    CHECK(service->token().label == "by-index");
    service->close();
  }
  HsmConfig config = config_for(token);
  config.token_label.reset();
  config.slot_index = 7;
  const std::string message = startup_error(std::move(config), metrics);
  CHECK(message.find("slot index 7 out of range") != std::string::npos);
}

TEST_CASE("a missing module is a StartupError naming the path", "[startup]") {
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config;
  config.module_path = "/nonexistent/libvendor-pkcs11.so";
  config.token_label = "x";
  config.pin = SecretString("1234");
  const std::string message = startup_error(std::move(config), metrics);
  CHECK(message.rfind("cannot load PKCS#11 module /nonexistent/libvendor-pkcs11.so: ", 0) == 0);
}

TEST_CASE("a library that is not a PKCS#11 module is a StartupError", "[startup]") {
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config;
  config.module_path = "libm.so.6";
  config.token_label = "x";
  config.pin = SecretString("1234");
  const std::string message = startup_error(std::move(config), metrics);
  CHECK(message.find("C_GetFunctionList") != std::string::npos);
}

TEST_CASE("no token selection is a StartupError", "[startup]") {
  SoftHsmToken token("unselected");
  prometheus::Registry registry;
  AgentMetrics metrics(registry);
  HsmConfig config = config_for(token);
  config.token_label.reset();
  const std::string message = startup_error(std::move(config), metrics);
  CHECK(message.find("no token selected") != std::string::npos);
}
