// Reliability of the real agent against real PKCS#11 faults (issue 4, docs/reliability.md): the
// agent runs on the fault-injecting module (tests/fault_module) in front of a private SoftHSMv2
// token, and each scenario writes the module's control file and reads its stats file.
#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "fixtures/fault_module.hpp"
#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;
using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

// A client that shows the agent's answers as they are: no retries.
hsm::Client direct_client(const std::string& socket, std::chrono::milliseconds timeout) {
  hsm::ClientOptions options;
  options.socket_path = socket;
  options.timeout = timeout;
  options.retry.max_attempts = 1;
  return hsm::Client(options);
}

double metric(const AgentProcess& agent, const std::string& series) {
  const auto [status, text] = agent.http_get("/metrics");
  REQUIRE(status == 200);
  return metric_sample(text, series);
}

const std::string kSignDeviceErrors =
    R"(hsm_agent_pkcs11_errors_total{ckr="CKR_DEVICE_ERROR",function="C_Sign"})";

hsm::protocol::Request sign_request(std::uint32_t msgid, const std::string& kid,
                                    std::optional<std::uint32_t> timeout_ms) {
  hsm::protocol::SignParams params;
  params.kid = kid;
  params.input = hsm::protocol::Data{to_bytes("hung-" + std::to_string(msgid))};
  return {msgid, Method::kSign, params, timeout_ms};
}

// An agent behind the fault module, with one ES256 key and its public key.
struct FaultyAgent {
  /// `checks`: how often the module re-reads its rules; `module_env`: more of the agent's
  /// environment for the module (HSM_FAULT_*).
  FaultyAgent(std::vector<std::string> agent_args, const std::string& kid,
              FaultModule::RuleChecks checks = FaultModule::RuleChecks::kEveryMillisecond,
              const std::map<std::string, std::string>& module_env = {})
      : faults(checks), env([&] {
          auto options = faults.agent_options(std::move(agent_args));
          options.env.insert(module_env.begin(), module_env.end());
          return options;
        }()) {
    env.client.generate_key(kid);
    pub = env.client.get_public_key(kid);
  }
  FaultModule faults;
  RunningAgent env;
  hsm::PublicKey pub;
};

}  // namespace

TEST_CASE(
    "a device error on C_Sign for 2 s under load: every request answered in time, "
    "then signing recovers without a restart",
    "[reliability]") {
  // Each request's deadline: the clients' timeout, which they send as timeout_ms. A request
  // that outlived it would end as deadline_exceeded or a client timeout, both failures below.
  constexpr auto kDeadline = 2000ms;
  constexpr auto kSlack = 2000ms;  // scheduling on a loaded CI machine, not the agent's budget
  FaultModule faults;
  RunningAgent env(faults.agent_options({"--sessions", "4", "--max-sessions", "4",
                                         "--probe-interval", "1", "--request-timeout", "2000"}));
  env.client.generate_key("load");
  const pid_t pid = env.agent.pid();

  struct Call {
    Clock::time_point start, end;
    std::string code;  // "ok" or the error code
  };
  std::mutex calls_mutex;
  std::vector<Call> calls;
  std::atomic<bool> stop{false};
  std::vector<std::thread> signers;
  for (int t = 0; t < 4; ++t) {
    signers.emplace_back([&, t] {
      hsm::Client client = direct_client(env.agent.socket_path(), kDeadline);
      for (int i = 0; !stop.load(); ++i) {
        Call call;
        call.start = Clock::now();
        try {
          (void)client.sign("load", "signer " + std::to_string(t) + " call " + std::to_string(i));
          call.code = "ok";
        } catch (const hsm::Error& e) {
          call.code = e.code();
        }
        call.end = Clock::now();
        {
          std::lock_guard lock(calls_mutex);
          calls.push_back(call);
        }
        if (call.code != "ok") std::this_thread::sleep_for(10ms);  // a client's pause
      }
    });
  }
  const auto successes_since = [&](Clock::time_point since) {
    std::lock_guard lock(calls_mutex);
    return std::count_if(calls.begin(), calls.end(),
                         [&](const Call& c) { return c.code == "ok" && c.start >= since; });
  };

  std::this_thread::sleep_for(500ms);
  const auto fault_start = Clock::now();
  faults.set("C_Sign rv=CKR_DEVICE_ERROR");
  std::this_thread::sleep_for(2s);
  faults.clear();
  const auto cleared = Clock::now();
  const bool recovered = wait_until([&] { return successes_since(cleared) >= 20; }, 15s);
  stop = true;
  for (auto& signer : signers) signer.join();

  CHECK(recovered);
  CHECK(env.agent.running());
  CHECK(env.agent.pid() == pid);
  std::map<std::string, std::size_t> codes;
  Clock::duration longest{};
  std::size_t unavailable_in_fault = 0;
  Clock::time_point first_success_after_clear = Clock::time_point::max();
  for (const Call& call : calls) {
    ++codes[call.code];
    longest = std::max(longest, call.end - call.start);
    if (call.code == "hsm_unavailable" && call.start >= fault_start && call.end <= cleared) {
      ++unavailable_in_fault;
    }
    if (call.code == "ok" && call.start >= cleared) {
      first_success_after_clear = std::min(first_success_after_clear, call.end);
    }
  }
  std::ostringstream summary;
  for (const auto& [code, count] : codes) summary << code << ": " << count << "; ";
  INFO("answers: " << summary.str() << "longest wait "
                   << std::chrono::duration_cast<std::chrono::milliseconds>(longest).count()
                   << " ms");
  // Every request answered, and only with success or hsm_unavailable (no client-side timeout,
  // no dropped connection, no other error).
  CHECK(codes.size() == codes.count("ok") + codes.count("hsm_unavailable"));
  CHECK(codes["ok"] > 0);
  // No request waited longer than its deadline.
  CHECK(longest <= kDeadline + kSlack);
  CHECK(unavailable_in_fault > 0);
  REQUIRE(first_success_after_clear != Clock::time_point::max());
  // "Within a few seconds": the backoff is capped at 5 s.
  CHECK(first_success_after_clear - cleared <= 10s);
  CHECK(metric(env.agent, kSignDeviceErrors) > 0);
  CHECK(faults.count("C_Finalize") >= 1);  // it really re-initialised
  // The same process still signs, and the signature verifies.
  const auto pub = env.client.get_public_key("load");
  const auto signature = env.client.sign("load", "after the fault");
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("after the fault"), signature));
}

TEST_CASE("CKR_SESSION_HANDLE_INVALID once on C_Sign: the request still succeeds",
          "[reliability]") {
  FaultyAgent agent({"--sessions", "2", "--max-sessions", "2"}, "retry");
  auto& [faults, env, pub] = agent;
  (void)env.client.sign("retry", "warm the handle cache");
  REQUIRE(wait_until([&] { return faults.count("C_Sign") >= 1; }));
  std::this_thread::sleep_for(100ms);  // the stats file is rewritten at most every 25 ms
  const std::uint64_t signs_before = faults.count("C_Sign");

  faults.set("C_Sign rv=CKR_SESSION_HANDLE_INVALID count=1");
  hsm::Client client = direct_client(env.agent.socket_path(), 5s);
  const auto signature = client.sign("retry", "retried transparently");
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("retried transparently"), signature));
  // The fault was hit, and the retry was a second C_Sign for the same request.
  REQUIRE(wait_until([&] { return faults.count("C_Sign.injected") == 1; }));
  CHECK(wait_until([&] { return faults.count("C_Sign") == signs_before + 2; }));
  // A session error is not a token fault: no re-initialisation.
  CHECK(faults.count("C_Finalize") == 0);
  CHECK(metric(env.agent, "hsm_agent_hsm_up") == 1);
}

TEST_CASE(
    "C_Sign hung on one session: other sessions keep signing, the hung request ends in "
    "deadline_exceeded",
    "[reliability]") {
  FaultyAgent agent({"--sessions", "4", "--max-sessions", "4", "--request-timeout", "1500"},
                    "hang");
  auto& [faults, env, pub] = agent;

  faults.set("C_Sign hang=1 session=first");
  auto hung = env.connect();
  const auto sent = Clock::now();
  REQUIRE(hung.send(sign_request(7, "hang", 1500)));
  REQUIRE(wait_until([&] { return faults.count("C_Sign.injected") == 1; }, 10s));

  // The other three sessions serve everyone else meanwhile.
  hsm::Client client = direct_client(env.agent.socket_path(), 5s);
  for (int i = 0; i < 20; ++i) {
    const std::string data = "while one hangs " + std::to_string(i);
    const auto signature = client.sign("hang", data);
    CHECK(verify_with_spki(pub.spki, "ES256", to_bytes(data), signature));
  }

  const auto response = hung.receive_response(Method::kSign, 10s);
  const auto waited = Clock::now() - sent;
  REQUIRE(response);
  CHECK(response->msgid == 7);
  const auto* error = std::get_if<hsm::protocol::Error>(&response->body);
  REQUIRE(error != nullptr);
  CHECK(error->code == ErrorCode::kDeadlineExceeded);
  CHECK(waited >= 1400ms);          // answered at its deadline, not before
  CHECK(waited < 1500ms + 5000ms);  // and then: not left hanging (slack for a loaded machine)
  // The agent was idle, so the hung sign ran on the thread that read it (docs/performance.md):
  // the watchdog handed the event loop to another worker, which served everything above.
  CHECK(metric(env.agent, "hsm_agent_loop_hand_overs_total") >= 1);

  // Releasing the hang lets the stuck call finish; the agent discards its late result.
  faults.clear();
  CHECK(wait_until([&] {
    try {
      (void)client.sign("hang", "after the hang");
      return true;
    } catch (const hsm::Error&) {
      return false;
    }
  }));
  CHECK(env.agent.running());
}

TEST_CASE("a slow token's signs stop running inline after the first one overstays",
          "[reliability]") {
  FaultyAgent agent({"--sessions", "2", "--max-sessions", "2"}, "slow");
  auto& [faults, env, pub] = agent;
  faults.set("C_Sign delay_ms=50");
  for (int i = 0; i < 20; ++i) {
    const std::string data = "slow token " + std::to_string(i);
    CHECK(verify_with_spki(pub.spki, "ES256", to_bytes(data), env.client.sign("slow", data)));
  }
  // The first sign ran inline (nothing known of the token yet) and overstayed the watchdog's
  // 2 ms: the loop was handed over. Its 50 ms put the average sign time far past the inline
  // limit, so the other 19 went to the workers, and no loop was handed over again.
  CHECK(metric(env.agent, "hsm_agent_loop_hand_overs_total") == 1);
}

TEST_CASE(
    "a hung inline sign holds up no other connection of its worker: capabilities, health and "
    "signs answer, and the hung one gets deadline_exceeded",
    "[reliability]") {
  // One worker: every connection shares the loop whose thread the hung sign holds.
  FaultyAgent agent({"--workers", "1", "--sessions", "2", "--request-timeout", "1500"}, "same");
  auto& [faults, env, pub] = agent;
  faults.set("C_Sign hang=1 count=1");
  RawConnection hung(env.agent.socket_path());
  const auto sent = Clock::now();
  REQUIRE(hung.send(sign_request(1, "same", 1500)));
  REQUIRE(wait_until([&] { return faults.count("C_Sign.injected") == 1; }, 10s));

  // While it hangs: a new connection and the one already open both get answers from that loop.
  RawConnection other(env.agent.socket_path());
  const auto asked = Clock::now();
  const auto capabilities = other.call({2, Method::kCapabilities, {}, std::nullopt}, 5s);
  REQUIRE(capabilities);
  CHECK(std::holds_alternative<hsm::protocol::Result>(capabilities->body));
  const auto health = other.call({3, Method::kHealth, {}, std::nullopt}, 5s);
  REQUIRE(health);
  CHECK(std::holds_alternative<hsm::protocol::Result>(health->body));
  const auto signature = env.client.sign("same", "while the first one hangs");
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("while the first one hangs"), signature));
  // All of it long before the hung sign's deadline: the loop did not wait for the token.
  CHECK(Clock::now() - sent < 1400ms);
  INFO("answered after "
       << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - asked).count()
       << " ms");
  CHECK(metric(env.agent, "hsm_agent_loop_hand_overs_total") == 1);

  const auto response = hung.receive_response(Method::kSign, 10s);
  REQUIRE(response);
  const auto* error = std::get_if<hsm::protocol::Error>(&response->body);
  REQUIRE(error != nullptr);
  CHECK(error->code == ErrorCode::kDeadlineExceeded);
  faults.clear();
  CHECK(wait_until([&] {
    try {
      (void)env.client.sign("same", "after the hang");
      return true;
    } catch (const hsm::Error&) {
      return false;
    }
  }));
}

TEST_CASE(
    "a PIN refused at start (wrong, locked, expired): one C_Login, one line naming it, exit 1",
    "[reliability][pin]") {
  struct Refusal {
    std::string ckr;
    std::string condition;
    bool by_rule;  // refused by the fault module; else SoftHSMv2 refuses a wrong PIN itself
  };
  for (const Refusal& refusal : {Refusal{"CKR_PIN_INCORRECT", "wrong PIN", false},
                                 Refusal{"CKR_PIN_LOCKED", "locked user PIN", true},
                                 Refusal{"CKR_PIN_EXPIRED", "expired user PIN", true}}) {
    INFO(refusal.ckr);
    FaultModule faults;
    SoftHsmToken token("refused-pin", "73915286");  // PINs no log line holds by chance
    const std::string given = refusal.by_rule ? token.user_pin() : "99999999";
    const auto pin_file = faults.directory() / "pin";
    { std::ofstream(pin_file) << given; }
    std::filesystem::permissions(
        pin_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    if (refusal.by_rule) faults.set("C_Login rv=" + refusal.ckr);
    auto env = faults.env();
    env["SOFTHSM2_CONF"] = token.config_path().string();
    const auto result =
        run_agent({"--module", HSM_FAULT_MODULE, "--token-label", token.label(), "--pin-file",
                   pin_file.string(), "--socket", (faults.directory() / "agent.sock").string(),
                   "--metrics-listen", ""},
                  env);
    INFO(result.err);
    CHECK(result.status.exited);
    CHECK(result.status.code == 1);
    CHECK(result.err.find("hsm-agent: " + refusal.condition + " for token 'refused-pin': " +
                          refusal.ckr + " (not retried)") != std::string::npos);
    if (refusal.by_rule) CHECK(result.err.find("wrong PIN") == std::string::npos);
    CHECK(result.err.find(given) == std::string::npos);
    CHECK(faults.count("C_Login") == 1);  // exact: the stats file is written at C_Finalize
  }
}

TEST_CASE(
    "a PIN refused at re-login (wrong, locked, expired): one C_Login, not ready naming the "
    "condition, still up, signs refused with its CKR",
    "[reliability][pin]") {
  // What the agent must say for each refusal: the CKR and the condition in words. A locked or
  // expired PIN is not a wrong one: the operator's remedy differs (docs/reliability.md).
  struct Refusal {
    std::string ckr;
    std::string condition;
  };
  const std::array<Refusal, 3> refusals = {{{"CKR_PIN_INCORRECT", "wrong PIN"},
                                            {"CKR_PIN_LOCKED", "locked user PIN"},
                                            {"CKR_PIN_EXPIRED", "expired user PIN"}}};
  // A PIN no log line, port or timestamp contains by chance.
  const std::string pin = "73915286";
  // One agent per refusal, all at once, so that they share the wait that shows no retry comes.
  struct Subject {
    Subject(const Refusal& which, const std::string& pin)
        : refusal(which),
          token("relogin", pin),
          agent(token, faults.agent_options(
                           {"--sessions", "2", "--max-sessions", "2", "--probe-interval", "1"})),
          client(direct_client(agent.socket_path(), 2s)) {}
    Refusal refusal;
    FaultModule faults;
    SoftHsmToken token;
    AgentProcess agent;
    hsm::Client client;
    std::uint64_t logins_before = 0;
  };
  // An array destroys its elements last to first, as nested tokens require.
  std::array<std::optional<Subject>, 3> subjects;
  for (std::size_t i = 0; i < refusals.size(); ++i) {
    Subject& s = subjects[i].emplace(refusals[i], pin);
    (void)s.client.generate_key("pin");
    REQUIRE(wait_until([&] { return s.agent.http_get("/readyz").first == 200; }));
    s.logins_before = s.faults.count("C_Login");
    CHECK(s.logins_before == 1);
  }

  // The token goes away (a re-initialisation follows) and then refuses the PIN.
  for (auto& subject : subjects) {
    Subject& s = *subject;
    INFO(s.refusal.ckr);
    s.faults.set("C_Login rv=" + s.refusal.ckr + "\nC_Sign rv=CKR_DEVICE_REMOVED count=1");
    try {
      (void)s.client.sign("pin", "x");
      FAIL("signed during a device error");
    } catch (const hsm::Error& e) {
      CHECK(e.code() == "hsm_unavailable");
      CHECK(e.ckr() == std::optional<std::string>("CKR_DEVICE_REMOVED"));
    }
  }
  for (auto& subject : subjects) {
    INFO(subject->refusal.ckr);
    REQUIRE(
        wait_until([&] { return subject->faults.count("C_Login") == subject->logins_before + 1; }));
  }
  // Several seconds (many probe intervals, past the backoff cap) later: still exactly one.
  std::this_thread::sleep_for(6s);

  for (auto& subject : subjects) {
    Subject& s = *subject;
    const std::string& ckr = s.refusal.ckr;
    INFO(ckr);
    CHECK(s.faults.count("C_Login") == s.logins_before + 1);
    CHECK(s.faults.count("C_Login.injected") == 1);
    CHECK(s.agent.running());
    CHECK(s.agent.http_get("/healthz").first == 200);

    const auto [status, reason] = s.agent.http_get("/readyz");
    INFO("/readyz: " << reason);
    CHECK(status == 503);
    CHECK(reason.find("refused the PIN") != std::string::npos);
    CHECK(reason.find(s.refusal.condition) != std::string::npos);
    CHECK(reason.find(ckr) != std::string::npos);
    CHECK(reason.find(pin) == std::string::npos);
    CHECK(std::count(reason.begin(), reason.end(), '\n') <= 1);  // one line
    const std::string log = s.agent.stderr_text();
    CHECK(log.find("refused the PIN") != std::string::npos);
    CHECK(log.find(s.refusal.condition) != std::string::npos);
    CHECK(log.find(pin) == std::string::npos);
    CHECK(metric(s.agent, R"(hsm_agent_logins_total{result=")" + ckr + R"("})") == 1);
    CHECK(metric(s.agent, "hsm_agent_hsm_up") == 0);

    // Requests answer at once without touching the token, with the refusal's CKR and
    // condition, and without promising a re-initialisation that will not come. (A request
    // left waiting would end in a client timeout at the client's 2 s deadline.)
    const std::uint64_t signs = s.faults.count("C_Sign");
    try {
      (void)s.client.sign("pin", "y");
      FAIL("signed without a login");
    } catch (const hsm::Error& e) {
      CHECK(e.code() == "hsm_unavailable");
      CHECK(e.ckr() == std::optional<std::string>(ckr));
      CHECK(e.message().find(s.refusal.condition) != std::string::npos);
      CHECK(e.message().find("re-initialising") == std::string::npos);
      CHECK(e.message().find(pin) == std::string::npos);
    }
    const hsm::Health health = s.client.health();
    CHECK_FALSE(health.ok);
    CHECK(health.error.value_or("").find(s.refusal.condition) != std::string::npos);
    std::this_thread::sleep_for(100ms);
    CHECK(s.faults.count("C_Sign") == signs);
  }
}

TEST_CASE(
    "a probe that hangs: not ready within 5 s of it, still alive and answering, ready again "
    "once the call returns",
    "[reliability][probe]") {
  FaultyAgent agent({"--sessions", "2", "--max-sessions", "2", "--probe-interval", "1"}, "probe");
  auto& [faults, env, pub] = agent;
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));
  const pid_t pid = env.agent.pid();
  const std::uint64_t finalized = faults.count("C_Finalize");
  hsm::Client client = direct_client(env.agent.socket_path(), 2s);

  // The probe's call: C_GetSessionInfo on the anchor session. Nothing else makes it while the
  // agent is idle and no call fails, so only the probe hangs.
  const auto set = Clock::now();
  faults.set("C_GetSessionInfo hang=1");
  REQUIRE(wait_until([&] { return faults.count("C_GetSessionInfo.injected") == 1; }, 5s));
  const auto hung = Clock::now();
  // A slow probe is tolerated up to the probe timeout (5 s), then the token is marked down.
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 503; }, 15s));
  const auto down = Clock::now();
  INFO("down " << std::chrono::duration_cast<std::chrono::milliseconds>(down - hung).count()
               << " ms after the hang was seen");
  CHECK(down - hung >= 4s);           // the hang began before we saw it
  CHECK(down - set <= 5s + 1s + 3s);  // timeout + probe interval + a loaded machine
  const auto [status, reason] = env.agent.http_get("/readyz");
  CHECK(status == 503);
  CHECK(reason.find("token probe has not answered for 5000 ms") != std::string::npos);
  CHECK(metric(env.agent, "hsm_agent_hsm_up") == 0);

  // The agent is alive and answers what needs no token; signs are refused at once.
  CHECK(env.agent.http_get("/healthz").first == 200);
  CHECK(client.capabilities().default_alg == "ES256");
  const hsm::Health health = client.health();
  CHECK_FALSE(health.ok);
  CHECK(health.error.value_or("").find("probe has not answered") != std::string::npos);
  const std::uint64_t signs = faults.count("C_Sign");
  try {
    (void)client.sign("probe", "while the probe hangs");
    FAIL("signed while the token is down");
  } catch (const hsm::Error& e) {
    CHECK(e.code() == "hsm_unavailable");
  }
  // The hung probe holds the recovery up: the library is never finalised under a call.
  CHECK(wait_until([&] {
    return env.agent.http_get("/readyz").second.find(
               "waiting for PKCS#11 calls still in progress") != std::string::npos;
  }));
  CHECK(faults.count("C_Finalize") == finalized);
  CHECK(faults.count("C_Sign") == signs);

  // The call returns: the agent re-initialises and is ready again, same process.
  faults.clear();
  CHECK(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));
  CHECK(metric(env.agent, "hsm_agent_hsm_up") == 1);
  CHECK(faults.count("C_Finalize") == finalized + 1);
  const auto signature = client.sign("probe", "after the hang");
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("after the hang"), signature));
  CHECK(env.agent.running());
  CHECK(env.agent.pid() == pid);
}

TEST_CASE("/readyz and hsm_up follow the token: 503 and 0 while it fails, 200 and 1 after",
          "[reliability][metrics]") {
  FaultModule faults;
  RunningAgent env(
      faults.agent_options({"--sessions", "2", "--max-sessions", "2", "--probe-interval", "1"}));
  env.client.generate_key("ready");
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));
  CHECK(metric(env.agent, "hsm_agent_hsm_up") == 1);
  CHECK(metric(env.agent, kSignDeviceErrors) == 0);

  // One failed C_Sign is counted by function and CKR.
  faults.set("C_Sign rv=CKR_DEVICE_ERROR count=1");
  hsm::Client client = direct_client(env.agent.socket_path(), 2s);
  try {
    (void)client.sign("ready", "x");
    FAIL("signed during a device error");
  } catch (const hsm::Error& e) {
    CHECK(e.code() == "hsm_unavailable");
    CHECK(e.ckr() == std::optional<std::string>("CKR_DEVICE_ERROR"));
  }
  CHECK(metric(env.agent, kSignDeviceErrors) == 1);
  // That took the token down; the agent re-initialises it and a probe confirms it.
  const std::string probes = "hsm_agent_hsm_probe_duration_seconds_count";
  REQUIRE(wait_until([&] {
    return env.agent.http_get("/readyz").first == 200 && metric(env.agent, probes) >= 1;
  }));
  CHECK(metric(env.agent, "hsm_agent_hsm_up") == 1);

  // The whole token fails: the next probe notices, /readyz says why, hsm_up drops.
  const double probes_before = metric(env.agent, probes);
  faults.set("* rv=CKR_DEVICE_ERROR");
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 503; }));
  const auto [status, reason] = env.agent.http_get("/readyz");
  CHECK(status == 503);
  CHECK(reason.find("token probe failed") != std::string::npos);
  CHECK(reason.find("CKR_DEVICE_ERROR") != std::string::npos);
  CHECK(metric(env.agent, probes) > probes_before);
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_hsm_up") == 0; }));

  try {
    (void)client.sign("ready", "y");
    FAIL("signed while the token is down");
  } catch (const hsm::Error& e) {
    CHECK(e.code() == "hsm_unavailable");
  }

  faults.clear();
  CHECK(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_hsm_up") == 1; }));
  CHECK(metric(env.agent, R"(hsm_agent_logins_total{result="ok"})") >= 2);  // logged in again
  const auto pub = env.client.get_public_key("ready");
  const auto signature = client.sign("ready", "back");
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("back"), signature));
}

namespace {

// How late after its deadline a request may be answered. The agent's goal is 10 ms (issue 15),
// but a goal is a speed figure, and this shared, noisy machine is no place to assert one: a
// loaded run here answered 3 of 8 idle requests 10-20 ms late, a CI ThreadSanitizer run 12 of 24
// loaded ones 20-100 ms late. What is asserted is the bound that separates a scheduling hiccup
// from a fault: the faults this catches were 290 ms (a loop left without a thread) and up to 1 s
// (answers waiting for the next tick). How many answers met the goal is reported as a warning.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr auto kDeadlineSlack = 100ms;  // sanitizer builds run 5-15 times slower
#else
constexpr auto kDeadlineSlack = 50ms;
#endif
constexpr auto kDeadlineGoal = 10ms;

void report_on_time_share(int on_time, std::size_t answers) {
  WARN(on_time << " of " << answers << " deadline answers within "
               << std::chrono::milliseconds(kDeadlineGoal).count() << " ms of their deadline");
}

// Sends one sign with `timeout_ms` on `connection` and returns how long its answer took, which
// must be deadline_exceeded.
Clock::duration time_deadline_answer(RawConnection& connection, std::uint32_t msgid,
                                     std::uint32_t timeout_ms) {
  const auto sent = Clock::now();
  REQUIRE(connection.send(sign_request(msgid, "slow", timeout_ms)));
  const auto response = connection.receive_response(Method::kSign, 10s);
  const auto waited = Clock::now() - sent;
  REQUIRE(response);
  CHECK(response->msgid == msgid);
  const auto* error = std::get_if<hsm::protocol::Error>(&response->body);
  REQUIRE(error != nullptr);
  CHECK(error->code == ErrorCode::kDeadlineExceeded);
  return waited;
}

}  // namespace

TEST_CASE("deadline_exceeded arrives at the deadline, idle and under load, queued or running",
          "[reliability][deadline]") {
  // Every sign takes 2.5 s in the token: each request below ends at its own deadline, whether
  // it is running in the token, waiting for a session or waiting for a worker.
  // The rule is in place before the agent starts (nothing at start signs), and the module
  // reads its rules on every call: no sign can slip through before the rule is seen.
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  faults.set("C_Sign delay_ms=2500");
  RunningAgent env(faults.agent_options({"--sessions", "2", "--max-sessions", "2"}));
  env.client.generate_key("slow");

  SECTION("idle: one request at a time, at several timeouts") {
    auto connection = env.connect();
    std::uint32_t msgid = 1;
    int on_time = 0, answers = 0;
    for (const std::uint32_t timeout_ms : {20U, 100U, 500U, 1500U, 20U, 100U, 500U, 20U}) {
      const auto waited = time_deadline_answer(connection, msgid++, timeout_ms);
      const auto timeout = std::chrono::milliseconds(timeout_ms);
      INFO("timeout_ms " << timeout_ms << ": answered after "
                         << (std::chrono::duration<double, std::milli>(waited).count()) << " ms");
      CHECK(waited >= timeout - 1ms);
      CHECK(waited <= timeout + kDeadlineSlack);
      ++answers;
      on_time += waited <= timeout + kDeadlineGoal ? 1 : 0;
    }
    report_on_time_share(on_time, static_cast<std::size_t>(answers));
  }

  SECTION("under load: 24 requests in flight on 2 sessions, each answered at its own deadline") {
    constexpr std::size_t kConnections = 4;
    constexpr std::size_t kPerConnection = 6;
    std::vector<RawConnection> connections;
    for (std::size_t c = 0; c < kConnections; ++c) connections.push_back(env.connect());
    struct Sent {
      Clock::time_point at;
      std::chrono::milliseconds timeout;
    };
    std::map<std::uint32_t, Sent> sent;
    std::uint32_t msgid = 100;
    for (std::size_t i = 0; i < kPerConnection; ++i) {
      for (std::size_t c = 0; c < kConnections; ++c) {
        const auto timeout = std::chrono::milliseconds(50 + 40 * ((msgid * 7) % 10));
        sent[msgid] = {Clock::now(), timeout};
        REQUIRE(connections[c].send(
            sign_request(msgid, "slow", static_cast<std::uint32_t>(timeout.count()))));
        ++msgid;
      }
    }
    // Answers arrive in deadline order across connections: read each connection on its own
    // thread so that no answer waits for the test to get round to it.
    std::mutex mutex;
    std::vector<std::tuple<std::uint32_t, Clock::duration, std::optional<ErrorCode>>> answers;
    std::vector<std::thread> readers;
    for (std::size_t c = 0; c < kConnections; ++c) {
      readers.emplace_back([&, c] {
        for (std::size_t i = 0; i < kPerConnection; ++i) {
          const auto response = connections[c].receive_response(Method::kSign, 10s);
          const auto now = Clock::now();
          std::lock_guard lock(mutex);
          if (!response) {
            answers.emplace_back(0, Clock::duration::max(), std::nullopt);
            return;
          }
          std::optional<ErrorCode> code;
          if (const auto* error = std::get_if<hsm::protocol::Error>(&response->body)) {
            code = error->code;
          }
          answers.emplace_back(response->msgid, now - sent.at(response->msgid).at, code);
        }
      });
    }
    for (auto& reader : readers) reader.join();
    REQUIRE(answers.size() == kConnections * kPerConnection);
    int on_time = 0;
    for (const auto& [id, waited, code] : answers) {
      REQUIRE(id != 0);
      const auto timeout = sent.at(id).timeout;
      INFO("msgid " << id << ", timeout " << timeout.count() << " ms: answered after "
                    << (std::chrono::duration<double, std::milli>(waited).count()) << " ms");
      CHECK(code == ErrorCode::kDeadlineExceeded);
      CHECK(waited >= timeout - 1ms);
      CHECK(waited <= timeout + kDeadlineSlack);
      on_time += waited <= timeout + kDeadlineGoal ? 1 : 0;
    }
    report_on_time_share(on_time, answers.size());
  }
  CHECK(env.agent.running());
}

namespace {

const std::string kIdleSessions = R"(hsm_agent_sessions{state="idle"})";
const std::string kBusySessions = R"(hsm_agent_sessions{state="busy"})";

// Sessions open in the agent's pool (idle + busy), from /metrics; -1 when /metrics did not
// answer. No assertion here: it also runs on a watcher thread, and Catch2's are not thread-safe.
double open_sessions(const AgentProcess& agent) {
  const auto [status, text] = agent.http_get("/metrics");
  if (status != 200) return -1;
  return metric_sample(text, kIdleSessions) + metric_sample(text, kBusySessions);
}

// `count` signs at once, each from its own connection; every one must verify.
void sign_concurrently(const AgentProcess& agent, const std::string& kid, const hsm::PublicKey& pub,
                       int count) {
  std::vector<std::thread> threads;
  std::atomic<int> verified{0};
  for (int i = 0; i < count; ++i) {
    threads.emplace_back([&, i] {
      try {
        hsm::Client client = direct_client(agent.socket_path(), 20s);
        const std::string data = "concurrent " + std::to_string(i);
        if (verify_with_spki(pub.spki, "ES256", to_bytes(data), client.sign(kid, data))) {
          ++verified;
        }
      } catch (const std::exception&) {
        // counted as not verified
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(verified == count);
}

}  // namespace

TEST_CASE(
    "the session pool grows while requests wait, never past --max-sessions, and shrinks back "
    "to --sessions when idle",
    "[reliability][pool]") {
  FaultyAgent agent({"--sessions", "1", "--max-sessions", "4", "--session-idle-timeout", "1"},
                    "pool");
  auto& [faults, env, pub] = agent;
  CHECK(metric(env.agent, "hsm_agent_sessions_limit") == 4);
  CHECK(open_sessions(env.agent) == 1);
  const std::uint64_t opened_before = faults.count("C_OpenSession");
  const std::uint64_t closed_before = faults.count("C_CloseSession");

  // 8 signs at once, each 300 ms inside the token: with one session they would queue; the pool
  // opens sessions for them, up to 4 and no more.
  faults.set("C_Sign delay_ms=300");
  std::atomic<bool> load_done{false};
  double most_open = 0;
  std::thread watcher([&] {
    while (!load_done) {
      most_open = std::max(most_open, open_sessions(env.agent));
      std::this_thread::sleep_for(20ms);
    }
  });
  sign_concurrently(env.agent, "pool", pub, 8);
  load_done = true;
  watcher.join();
  faults.clear();
  CHECK(most_open > 1);
  CHECK(most_open <= 4);
  // The stats file is rewritten within ~25 ms of a change.
  CHECK(wait_until([&] { return faults.count("C_OpenSession") - opened_before == 3; }, 5s));
  CHECK(faults.count("C_OpenSession") - opened_before == 3);

  // Idle for --session-idle-timeout (1 s): back to one session, the other three closed.
  CHECK(wait_until([&] { return open_sessions(env.agent) == 1; }, 10s));
  CHECK(wait_until([&] { return faults.count("C_CloseSession") - closed_before == 3; }, 5s));
  // And it still signs, growing again when needed.
  CHECK(verify_with_spki(pub.spki, "ES256", to_bytes("after"), env.client.sign("pool", "after")));
}

TEST_CASE(
    "a token that states a session limit (ulMaxSessionCount): the pool never opens more, never "
    "hears CKR_SESSION_COUNT, and every request succeeds",
    "[reliability][pool]") {
  // The fault module plays a token that allows 4 sessions and refuses a fifth, as real HSMs do:
  // one is the login's anchor, so the pool may open 3 and must learn that from C_GetTokenInfo.
  FaultyAgent agent({"--sessions", "2", "--max-sessions", "16"}, "limited",
                    FaultModule::RuleChecks::kEveryMillisecond, {{"HSM_FAULT_MAX_SESSIONS", "4"}});
  auto& [faults, env, pub] = agent;
  CHECK(metric(env.agent, "hsm_agent_sessions_limit") == 3);
  faults.set("C_Sign delay_ms=100");
  std::this_thread::sleep_for(5ms);  // the module's 1 ms rule poll
  sign_concurrently(env.agent, "limited", pub, 8);
  faults.clear();
  CHECK(open_sessions(env.agent) <= 3);
  CHECK(faults.count("C_OpenSession") >= 2);
  const std::string log = env.agent.stderr_text();
  INFO(log);
  CHECK(log.find("the token allows 3 sessions") != std::string::npos);
  CHECK(log.find("CKR_SESSION_COUNT") == std::string::npos);
}

TEST_CASE(
    "a token that refuses more sessions (CKR_SESSION_COUNT): the pool stops growing there, "
    "says so once, and requests still succeed",
    "[reliability][pool]") {
  // Every call into the module sees the rules written before it. With the default 1 ms between
  // re-reads, a C_OpenSession that raced the re-read of another thread still opened a third
  // session (seen in CI, and again with the agent's latency mode on a loaded machine).
  FaultyAgent agent({"--sessions", "2", "--max-sessions", "16"}, "limit",
                    FaultModule::RuleChecks::kEveryCall);
  auto& [faults, env, pub] = agent;
  CHECK(metric(env.agent, "hsm_agent_sessions_limit") == 16);
  faults.set("C_OpenSession rv=CKR_SESSION_COUNT\nC_Sign delay_ms=100");
  sign_concurrently(env.agent, "limit", pub, 8);
  faults.clear();
  // The limit is what was open when the token refused: the two sessions it started with.
  CHECK(metric(env.agent, "hsm_agent_sessions_limit") == 2);
  CHECK(open_sessions(env.agent) == 2);
  CHECK(faults.count("C_OpenSession.injected") >= 1);
  const std::string log = env.agent.stderr_text();
  INFO(log);
  const auto first = log.find("CKR_SESSION_COUNT");
  REQUIRE(first != std::string::npos);
  CHECK(log.find("CKR_SESSION_COUNT", first + 1) == std::string::npos);
  // The limit holds once the token would allow more: no new C_OpenSession.
  const std::uint64_t opened = faults.count("C_OpenSession");
  faults.set("C_Sign delay_ms=100");
  sign_concurrently(env.agent, "limit", pub, 4);
  CHECK(faults.count("C_OpenSession") == opened);
}
