// Shared helpers for the agent's unit tests: a KeyService opened on a private SoftHSMv2 token
// (with its own metrics registry), typed request helpers, and a runner for pkcs11-tool.
#pragma once

#include <prometheus/registry.h>

#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "fixtures/softhsm_token.hpp"
#include "metrics/agent_metrics.hpp"
#include "service/key_service.hpp"
#include "service/token_state.hpp"

namespace hsm::agent::test {

using protocol::Bytes;

struct ServiceOptions {
  bool read_only = false;
  unsigned sessions = 2;
  unsigned max_sessions = 0;                       // 0: same as sessions (a fixed pool)
  std::string module = hsm::test::kSoftHsmModule;  // or HSM_FAULT_MODULE (fault_fixture.hpp)
  ObjectChanges object_changes = ObjectChanges::kAuto;
};

/// The HsmConfig that opens `token` by label with its user PIN.
[[nodiscard]] HsmConfig config_for(const hsm::test::SoftHsmToken& token,
                                   const ServiceOptions& options = {});

/// A KeyService on `token`; closed and destroyed with the fixture.
class OpenService {
 public:
  explicit OpenService(const hsm::test::SoftHsmToken& token, const ServiceOptions& options = {});
  ~OpenService();
  OpenService(const OpenService&) = delete;
  OpenService& operator=(const OpenService&) = delete;

  [[nodiscard]] KeyService& service() { return *service_; }
  /// The service's token, for tests that drive faults and recovery themselves.
  [[nodiscard]] TokenState& token_state() { return *state_; }
  [[nodiscard]] AgentMetrics& metrics() { return metrics_; }

  [[nodiscard]] Outcome call(protocol::Method method, protocol::Params params);

  /// Runs the request and REQUIREs a result of type R.
  template <typename R>
  R ok(protocol::Method method, protocol::Params params);
  /// Runs the request and REQUIREs an error; returns it.
  protocol::Error error(protocol::Method method, protocol::Params params);

  protocol::KeyDescription generate(const std::string& kid, const std::string& alg);
  Bytes sign_data(const std::string& kid, const Bytes& data,
                  std::optional<std::string> alg = std::nullopt);
  bool verify_data(const std::string& kid, const Bytes& data, const Bytes& signature,
                   std::optional<std::string> alg = std::nullopt);
  protocol::PublicKeyResult public_key(const std::string& kid);

 private:
  prometheus::Registry registry_;
  AgentMetrics metrics_{registry_};
  std::shared_ptr<TokenState> state_;
  std::unique_ptr<KeyService> service_;
};

template <typename R>
R OpenService::ok(protocol::Method method, protocol::Params params) {
  Outcome outcome = call(method, std::move(params));
  if (const auto* error = std::get_if<protocol::Error>(&outcome)) {
    const std::string what =
        "unexpected error " + std::string{protocol::to_string(error->code)} + ": " + error->message;
    FAIL_CHECK(what);
  }
  const auto* result = std::get_if<protocol::Result>(&outcome);
  REQUIRE(result != nullptr);
  const R* typed = std::get_if<R>(result);
  REQUIRE(typed != nullptr);
  return *typed;
}

/// Runs pkcs11-tool against SoftHSMv2 (SOFTHSM2_CONF inherited from the token fixture) with
/// `args`; returns its exit status and puts its output in `output`.
int run_pkcs11_tool(const std::vector<std::string>& args, std::string& output);

/// Bytes of a string.
[[nodiscard]] Bytes bytes_of(std::string_view text);

}  // namespace hsm::agent::test
