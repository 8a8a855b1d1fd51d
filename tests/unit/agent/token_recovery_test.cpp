// Token-level recovery (issue 4) against a real SoftHSMv2 token behind the fault-injecting
// module: TokenState marks the token down on a token-class CKR, answers at once while down,
// re-initialises (new login, new sessions, new handle cache), never retries a refused PIN, and
// never finalises under a call in progress. The TokenSupervisor drives it in the background
// and publishes hsm_up and readiness.
#include <atomic>
#include <catch2/catch.hpp>
#include <future>
#include <thread>

#include "fault_fixture.hpp"
#include "fixtures/polling.hpp"
#include "metrics/health_state.hpp"
#include "pkcs11/error.hpp"
#include "service/token_state.hpp"
#include "service/token_supervisor.hpp"
#include "service_fixture.hpp"

using hsm::test::wait_until;
using namespace hsm::agent;
using namespace std::chrono_literals;
namespace protocol = hsm::protocol;
using hsm::agent::test::bytes_of;
using hsm::agent::test::fault_module_path;
using hsm::agent::test::FaultRules;
using hsm::agent::test::OpenService;
using hsm::agent::test::pkcs11_calls;
using hsm::agent::test::ServiceOptions;
using hsm::test::SoftHsmToken;
using protocol::ErrorCode;
using protocol::Method;

namespace {

ServiceOptions through_faults(unsigned sessions = 2) {
  ServiceOptions options;
  options.sessions = sessions;
  options.module = fault_module_path();
  return options;
}

protocol::SignParams sign_params(const std::string& kid, const std::string& data) {
  return protocol::SignParams{kid, protocol::Data{bytes_of(data)}, std::nullopt, std::nullopt};
}

double logins(OpenService& svc, const std::string& result) {
  return svc.metrics().logins_total.Add({{"result", result}}).Value();
}

}  // namespace

TEST_CASE(
    "a device error takes the token down; down, requests answer at once; "
    "re-initialising brings it back",
    "[recovery]") {
  FaultRules faults;
  SoftHsmToken token("recovery");
  OpenService svc(token, through_faults());
  svc.generate("k", "ES256");
  (void)svc.sign_data("k", bytes_of("before"));
  TokenState& state = svc.token_state();
  CHECK(state.generation_number() == 1);

  faults.set("C_Sign rv=CKR_DEVICE_ERROR count=1");
  const protocol::Error fault = svc.error(Method::kSign, sign_params("k", "x"));
  CHECK(fault.code == ErrorCode::kHsmUnavailable);
  CHECK(fault.ckr == std::optional<std::string>("CKR_DEVICE_ERROR"));
  CHECK(state.is_down());
  CHECK_FALSE(svc.service().token_status().up);
  REQUIRE(svc.service().token_status().last_fault);
  CHECK(svc.service().token_status().last_fault->find("C_Sign") != std::string::npos);

  // Down: no PKCS#11 call at all, and the reason in the answer.
  const auto signs = pkcs11_calls(svc.metrics(), "C_Sign");
  const auto sign_inits = pkcs11_calls(svc.metrics(), "C_SignInit");
  const protocol::Error down = svc.error(Method::kSign, sign_params("k", "y"));
  CHECK(down.code == ErrorCode::kHsmUnavailable);
  CHECK(down.message.find("down") != std::string::npos);
  CHECK(down.ckr == std::optional<std::string>("CKR_DEVICE_ERROR"));
  CHECK(pkcs11_calls(svc.metrics(), "C_Sign") == signs);
  CHECK(pkcs11_calls(svc.metrics(), "C_SignInit") == sign_inits);
  const auto health = svc.ok<protocol::HealthResult>(Method::kHealth, protocol::EmptyParams{});
  CHECK_FALSE(health.ok);
  CHECK(health.token.label == "recovery");
  // capabilities (answered by the server from capabilities()) and import_key never need the
  // token: their answers do not change.
  CHECK_FALSE(svc.service().capabilities().supported_algs.empty());
  CHECK(svc.error(Method::kImportKey, protocol::EmptyParams{}).code == ErrorCode::kNotSupported);

  const Recovery recovery = state.reinitialise(1s);
  CHECK(recovery.result == Recovery::Result::kRecovered);
  CHECK_FALSE(state.is_down());
  CHECK(state.generation_number() == 2);
  CHECK(pkcs11_calls(svc.metrics(), "C_Finalize") == 1);
  CHECK(logins(svc, "ok") == 2);
  // The key is found again through a fresh handle cache, and signs.
  const auto signature = svc.sign_data("k", bytes_of("after"));
  CHECK(svc.verify_data("k", bytes_of("after"), signature));
  CHECK(svc.service().token_status().up);
  CHECK(state.reinitialise(1s).result == Recovery::Result::kAlreadyUp);
}

TEST_CASE("every token-class CKR marks the token down; session-class ones do not", "[recovery]") {
  FaultRules faults;
  SoftHsmToken token("classes");
  OpenService svc(token, through_faults());
  svc.generate("k", "ES256");
  TokenState& state = svc.token_state();
  int rule = 0;
  for (const char* ckr : {"CKR_DEVICE_ERROR", "CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT",
                          "CKR_TOKEN_NOT_RECOGNIZED", "CKR_CRYPTOKI_NOT_INITIALIZED",
                          "CKR_USER_NOT_LOGGED_IN", "CKR_GENERAL_ERROR"}) {
    INFO(ckr);
    // A new comment makes a new rule with a fresh count.
    faults.set(std::string("C_Sign count=1 rv=") + ckr + " # " + std::to_string(++rule));
    const protocol::Error error = svc.error(Method::kSign, sign_params("k", "x"));
    CHECK(error.code == ErrorCode::kHsmUnavailable);
    CHECK(state.is_down());
    CHECK(state.reinitialise(1s).result == Recovery::Result::kRecovered);
  }
  for (const char* ckr : {"CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED",
                          "CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID"}) {
    INFO(ckr);
    faults.set(std::string("C_Sign count=1 rv=") + ckr + " # " + std::to_string(++rule));
    // Retried once on a fresh session (or after dropping the cached handles): succeeds.
    const auto signature = svc.sign_data("k", bytes_of("retried"));
    CHECK(svc.verify_data("k", bytes_of("retried"), signature));
    CHECK_FALSE(state.is_down());
  }
}

TEST_CASE("re-initialisation fails while the token is gone and leaves it down; works after",
          "[recovery]") {
  FaultRules faults;
  SoftHsmToken token("gone");
  OpenService svc(token, through_faults());
  svc.generate("k", "ES256");
  TokenState& state = svc.token_state();

  faults.set("* rv=CKR_DEVICE_REMOVED");
  const ProbeResult probe = state.probe();
  CHECK(probe.ran);
  CHECK_FALSE(probe.ok);
  CHECK(probe.ckr == std::optional<std::string>("CKR_DEVICE_REMOVED"));
  CHECK(probe.error.find("C_GetSessionInfo") != std::string::npos);
  CHECK(state.mark_down(probe.generation, "token probe failed: " + probe.error, probe.ckr));
  CHECK_FALSE(state.mark_down(probe.generation, "again", std::nullopt));  // once per generation

  for (int attempt = 0; attempt < 3; ++attempt) {
    const Recovery recovery = state.reinitialise(1s);
    CHECK(recovery.result == Recovery::Result::kFailed);
    CHECK(recovery.detail.find("C_Initialize failed: CKR_DEVICE_REMOVED") != std::string::npos);
    CHECK(state.is_down());
    // The published state is untouched by the failed attempt: down, with its first reason.
    REQUIRE(state.fault());
    CHECK(state.fault()->reason.find("token probe failed") != std::string::npos);
    CHECK_FALSE(state.probe().ran);
    CHECK(svc.error(Method::kSign, sign_params("k", "x")).code == ErrorCode::kHsmUnavailable);
  }

  faults.clear();
  CHECK(state.reinitialise(1s).result == Recovery::Result::kRecovered);
  CHECK(state.probe().ok);
  (void)svc.sign_data("k", bytes_of("back"));
}

TEST_CASE("a PIN refused at re-login is never retried", "[recovery][pin]") {
  FaultRules faults;
  SoftHsmToken token("relogin");
  OpenService svc(token, through_faults());
  TokenState& state = svc.token_state();
  faults.set("C_Login rv=CKR_PIN_INCORRECT");
  REQUIRE(state.mark_down(state.generation_number(), "forced for the test", std::nullopt));

  const auto login_calls = pkcs11_calls(svc.metrics(), "C_Login");
  const Recovery first = state.reinitialise(1s);
  CHECK(first.result == Recovery::Result::kPinRejected);
  CHECK(first.detail.find("CKR_PIN_INCORRECT") != std::string::npos);
  CHECK(first.detail.find(token.user_pin()) == std::string::npos);
  CHECK(pkcs11_calls(svc.metrics(), "C_Login") == login_calls + 1);
  CHECK(logins(svc, "CKR_PIN_INCORRECT") == 1);
  // From now on the token is down for the refusal, not for the fault that started the recovery,
  // and requests are not told a re-initialisation is coming.
  const auto fault = state.fault();
  REQUIRE(fault);
  CHECK(fault->until_restart);
  CHECK(fault->ckr == std::optional<std::string>("CKR_PIN_INCORRECT"));
  CHECK(fault->reason.find("wrong PIN") != std::string::npos);
  const protocol::Error refused = svc.error(Method::kSign, sign_params("k", "x"));
  CHECK(refused.code == ErrorCode::kHsmUnavailable);
  CHECK(refused.ckr == std::optional<std::string>("CKR_PIN_INCORRECT"));
  CHECK(refused.message.find("until the agent restarts") != std::string::npos);
  CHECK(refused.message.find(token.user_pin()) == std::string::npos);

  // Even once the PIN would work again, nothing more is tried: a retry can lock the token.
  faults.clear();
  for (int i = 0; i < 5; ++i) {
    CHECK(state.reinitialise(1s).result == Recovery::Result::kPinRejected);
  }
  CHECK(pkcs11_calls(svc.metrics(), "C_Login") == login_calls + 1);
  CHECK(state.is_down());
}

TEST_CASE("a call in progress holds the re-initialisation up: never finalised under it",
          "[recovery]") {
  FaultRules faults;
  SoftHsmToken token("in-progress");
  OpenService svc(token, through_faults());
  svc.generate("k", "ES256");
  (void)svc.sign_data("k", bytes_of("warm"));
  TokenState& state = svc.token_state();

  faults.set("C_Sign hang=1");
  const auto sign_inits = pkcs11_calls(svc.metrics(), "C_SignInit");
  auto stuck = std::async(std::launch::async,
                          [&] { return svc.call(Method::kSign, sign_params("k", "stuck")); });
  // C_SignInit returned: the request is about to sign (and hang), holding generation 1.
  REQUIRE(wait_until([&] { return pkcs11_calls(svc.metrics(), "C_SignInit") > sign_inits; }));
  REQUIRE(state.mark_down(1, "forced for the test", std::nullopt));
  const Recovery busy = state.reinitialise(200ms);
  CHECK(busy.result == Recovery::Result::kBusy);
  CHECK(pkcs11_calls(svc.metrics(), "C_Finalize") == 0);

  faults.clear();  // the hung C_Sign goes on, against the still-initialised library
  const Outcome outcome = stuck.get();
  CHECK(std::holds_alternative<protocol::Result>(outcome));
  CHECK(state.reinitialise(1s).result == Recovery::Result::kRecovered);
  CHECK(pkcs11_calls(svc.metrics(), "C_Finalize") == 1);
  (void)svc.sign_data("k", bytes_of("after"));
}

TEST_CASE(
    "signers racing faults and re-initialisations: every answer is a signature or "
    "hsm_unavailable",
    "[recovery][concurrency]") {
  FaultRules faults;
  SoftHsmToken token("racing");
  OpenService svc(token, through_faults(4));
  svc.generate("k", "ES256");
  HealthState health;
  TokenSupervisor supervisor(svc.token_state(), health, svc.metrics(),
                             SupervisorOptions{.probe_interval = 20ms,
                                               .probe_timeout = 5s,
                                               .first_backoff = 5ms,
                                               .max_backoff = 50ms,
                                               .stable_after = 10s,
                                               .drain_wait = 100ms});
  std::atomic<bool> stop{false};
  std::atomic<int> signed_ok{0}, unavailable{0}, other{0};
  std::vector<std::thread> signers;
  for (int t = 0; t < 4; ++t) {
    signers.emplace_back([&] {
      while (!stop) {
        const Outcome outcome = svc.call(Method::kSign, sign_params("k", "race"));
        if (std::holds_alternative<protocol::Result>(outcome)) {
          ++signed_ok;
        } else if (std::get<protocol::Error>(outcome).code == ErrorCode::kHsmUnavailable) {
          ++unavailable;
        } else {
          ++other;
        }
      }
    });
  }
  for (int round = 0; round < 10; ++round) {
    faults.set("C_Sign rv=CKR_DEVICE_ERROR count=2 # round " + std::to_string(round));
    std::this_thread::sleep_for(50ms);
  }
  faults.clear();
  const int before = signed_ok.load();
  CHECK(wait_until([&] { return signed_ok.load() > before + 20; }));
  stop = true;
  for (auto& signer : signers) signer.join();
  CHECK(supervisor.stop());
  CHECK(other == 0);
  CHECK(unavailable > 0);
  CHECK(pkcs11_calls(svc.metrics(), "C_Finalize") >= 1);
}

TEST_CASE("the supervisor: readiness and hsm_up follow the probe; recovery in the background",
          "[supervisor]") {
  FaultRules faults;
  SoftHsmToken token("supervised");
  OpenService svc(token, through_faults());
  svc.generate("k", "ES256");
  HealthState health;
  TokenSupervisor supervisor(svc.token_state(), health, svc.metrics(),
                             SupervisorOptions{.probe_interval = 20ms,
                                               .probe_timeout = 5s,
                                               .first_backoff = 5ms,
                                               .max_backoff = 50ms,
                                               .stable_after = 10s,
                                               .drain_wait = 100ms});
  // Until the server listens, /readyz says "starting".
  std::this_thread::sleep_for(50ms);
  CHECK(health.not_ready_reason() == std::optional<std::string>("starting"));
  supervisor.set_serving();
  CHECK_FALSE(health.not_ready_reason());
  CHECK(svc.metrics().hsm_up.Value() == 1);
  CHECK(wait_until([&] {
    return svc.metrics().hsm_probe_duration_seconds.Collect().histogram.sample_count >= 2;
  }));

  faults.set("* rv=CKR_TOKEN_NOT_PRESENT");
  REQUIRE(wait_until([&] { return health.not_ready_reason().has_value(); }));
  const std::string reason = health.not_ready_reason().value();
  CHECK(reason.find("token probe failed") != std::string::npos);
  CHECK(reason.find("CKR_TOKEN_NOT_PRESENT") != std::string::npos);
  CHECK(reason.find('\n') == std::string::npos);
  CHECK(svc.metrics().hsm_up.Value() == 0);
  // Attempts keep failing in the background (C_Initialize refused) and say so.
  CHECK(wait_until([&] {
    const auto now = health.not_ready_reason();
    return now && now->find("last attempt: C_Initialize failed") != std::string::npos;
  }));
  CHECK(svc.error(Method::kSign, sign_params("k", "x")).code == ErrorCode::kHsmUnavailable);

  faults.clear();
  CHECK(wait_until([&] { return !health.not_ready_reason().has_value(); }));
  CHECK(svc.metrics().hsm_up.Value() == 1);
  (void)svc.sign_data("k", bytes_of("back"));
  CHECK(supervisor.stop());
  CHECK(supervisor.stop());  // idempotent
}

TEST_CASE("the supervisor: a PIN refused at re-login leaves the agent not ready, no retries",
          "[supervisor][pin]") {
  FaultRules faults;
  SoftHsmToken token("supervised-pin");
  OpenService svc(token, through_faults());
  HealthState health;
  TokenSupervisor supervisor(svc.token_state(), health, svc.metrics(),
                             SupervisorOptions{.probe_interval = 20ms,
                                               .probe_timeout = 5s,
                                               .first_backoff = 5ms,
                                               .max_backoff = 20ms,
                                               .stable_after = 10s,
                                               .drain_wait = 100ms});
  supervisor.set_serving();
  const auto login_calls = pkcs11_calls(svc.metrics(), "C_Login");
  // The probe fails once (down), then the re-login is refused.
  faults.set("C_GetSessionInfo rv=CKR_DEVICE_ERROR count=1\nC_Login rv=CKR_PIN_LOCKED");
  REQUIRE(wait_until([&] {
    const auto reason = health.not_ready_reason();
    return reason && reason->find("PIN") != std::string::npos;
  }));
  CHECK(health.not_ready_reason()->find("CKR_PIN_LOCKED") != std::string::npos);
  CHECK(health.not_ready_reason()->find("locked user PIN") != std::string::npos);
  CHECK(health.not_ready_reason()->find("security officer") != std::string::npos);
  std::this_thread::sleep_for(300ms);  // many probe intervals and backoff caps
  CHECK(pkcs11_calls(svc.metrics(), "C_Login") == login_calls + 1);
  CHECK(svc.metrics().hsm_up.Value() == 0);
  CHECK(supervisor.stop());
}
