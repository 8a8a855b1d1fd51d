// Observability of the real agent, judged from outside (docs/metrics.md is the contract):
//  - the audit log: every line is a JSON object (judged by Python's json module, not by us)
//    naming the caller from SO_PEERCRED, the method, kid and result, and for sign the SHA-256
//    of the signed input; successes of key operations, every failure and every denial are
//    audited, reads are not; --audit-log FILE survives rotation with SIGHUP, losing nothing;
//  - --log-format json: every stderr line is a JSON object with time, level and msg;
//  - /metrics: histograms carry the documented buckets, gauges return to rest, counters move
//    with requests, connections, protocol errors and PKCS#11 calls; the token-health metrics and
//    /readyz follow the token (the fault-injecting module takes it away and gives it back);
//    `promtool check metrics` accepts the real exposition after a varied workload; bounded
//    label sets exist at zero from the start; the queue wait histogram sees requests waiting for
//    a worker; slow readers are counted;
//  - /readyz turns 503 "draining" on SIGTERM; no audit line is lost on any exit path; refused
//    and invalid requests are audited, sign_batch per item; start-up failures are JSON lines
//    with --log-format json;
//  - `hsmctl metrics` summarises a real agent's /metrics;
//  - a real Prometheus server (Debian's /usr/bin/prometheus) scrapes every family of the
//    catalogue and loads deploy/prometheus/alerts.yaml with every rule healthy.
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fixtures/command.hpp"
#include "fixtures/fault_module.hpp"
#include "fixtures/json_lines.hpp"
#include "fixtures/polling.hpp"
#include "fixtures/prometheus_text.hpp"
#include "fixtures/temp_dir.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;
using namespace std::chrono_literals;
using hsm::protocol::Method;

namespace {

// ---- small tools -------------------------------------------------------------------------

std::string hex(const Bytes& bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (const auto b : bytes) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 0xF]);
  }
  return out;
}

/// The protocol error code a call failed with, or "no error".
std::string error_code_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const hsm::Error& e) {
    return e.code();
  }
  return "no error";
}

const std::regex kRfc3339Utc(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z)");

// ---- audit expectations --------------------------------------------------------------------

struct ExpectedAudit {
  std::string method;
  std::string kid;
  std::string result;
  std::optional<std::string> alg;     // checked when set
  std::optional<Bytes> signed_input;  // sign: input_sha256 = SHA-256 of it; else no such field
};

/// Every audit line of a request: the shape every line shares, the caller (this process: the
/// client is in-process), and what the expectation names.
void check_audit_lines(const std::vector<JsonLine>& lines,
                       const std::vector<ExpectedAudit>& expected) {
  REQUIRE(lines.size() == expected.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const auto& line = lines[i];
    const auto& want = expected[i];
    INFO("audit line " << i << ": " << want.method << " " << want.kid << " " << want.result);
    REQUIRE(line.ok());
    CHECK(line.str("event") == "request");
    CHECK(std::regex_match(line.str("time"), kRfc3339Utc));
    CHECK(line.str("method") == want.method);
    CHECK(line.str("kid") == want.kid);
    CHECK(line.str("result") == want.result);
    CHECK(line.number("duration_ms") >= 0);
    CHECK(line.integer("peer.uid") == std::to_string(::getuid()));
    CHECK(line.integer("peer.gid") == std::to_string(::getgid()));
    CHECK(line.integer("peer.pid") == std::to_string(::getpid()));
    if (want.alg) CHECK(line.str("alg") == *want.alg);
    if (want.signed_input) {
      CHECK(line.str("input_sha256") == hex(sha256(*want.signed_input)));
    } else {
      CHECK_FALSE(line.has("input_sha256"));
    }
    const std::set<std::string> allowed = {"time",     "event",    "method",      "kid",
                                           "alg",      "result",   "duration_ms", "peer.pid",
                                           "peer.uid", "peer.gid", "input_sha256"};
    for (const auto& key : line.keys()) {
      INFO("field " << key);
      CHECK(allowed.count(key) == 1);
    }
  }
}

// ---- /metrics -------------------------------------------------------------------------------

double metric(const AgentProcess& agent, const std::string& name,
              const std::map<std::string, std::string>& labels = {}) {
  return Scrape(agent).counter(name, labels);
}

// docs/metrics.md, "Series budget": the most series one agent may export after serving every
// method and seeing errors (each pod with the sidecar multiplies it).
constexpr std::size_t kSeriesBudget = 200;

// The metric catalogue of docs/metrics.md: every family and its type.
const std::vector<std::pair<std::string, std::string>> kCatalogue = {
    {"hsm_agent_requests_total", "counter"},
    {"hsm_agent_request_duration_seconds", "histogram"},
    {"hsm_agent_requests_in_flight", "gauge"},
    {"hsm_agent_pkcs11_calls_total", "counter"},
    {"hsm_agent_pkcs11_call_duration_seconds", "histogram"},
    {"hsm_agent_pkcs11_errors_total", "counter"},
    {"hsm_agent_sessions", "gauge"},
    {"hsm_agent_session_wait_seconds", "histogram"},
    {"hsm_agent_queue_wait_seconds", "histogram"},
    {"hsm_agent_loop_hand_overs_total", "counter"},
    {"hsm_agent_hsm_up", "gauge"},
    {"hsm_agent_hsm_probe_duration_seconds", "histogram"},
    {"hsm_agent_logins_total", "counter"},
    {"hsm_agent_connections_open", "gauge"},
    {"hsm_agent_connections_total", "counter"},
    {"hsm_agent_connections_rejected_total", "counter"},
    {"hsm_agent_protocol_errors_total", "counter"},
    {"hsm_agent_connections_closed_total", "counter"},
    {"hsm_agent_buffered_bytes", "gauge"},
    {"hsm_agent_buffered_bytes_limit", "gauge"},
    {"hsm_agent_memory_budget_waits_total", "counter"},
    {"hsm_agent_audit_dropped_lines_total", "counter"},
    {"hsm_agent_audit_write_errors_total", "counter"},
    {"hsm_agent_audit_failing", "gauge"},
    {"hsm_agent_log_dropped_lines_total", "counter"},
    {"hsm_agent_build_info", "gauge"},
    {"process_cpu_seconds_total", "counter"},
    {"process_resident_memory_bytes", "gauge"},
    {"process_virtual_memory_bytes", "gauge"},
    {"process_start_time_seconds", "gauge"},
    {"process_open_fds", "gauge"},
    {"process_max_fds", "gauge"},
};
hsm::Client client_for(const AgentProcess& agent, std::chrono::milliseconds timeout = 5s,
                       std::uint32_t attempts = 16) {
  hsm::ClientOptions options;
  options.socket_path = agent.socket_path();
  options.timeout = timeout;
  options.retry.max_attempts = attempts;
  return hsm::Client(options);
}

std::string agent_version() {
  const auto result = run_agent({"--version"});
  REQUIRE(result.status.exited);
  REQUIRE(result.status.code == 0);
  const auto space = result.out.find(' ');
  REQUIRE(space != std::string::npos);
  std::string version = result.out.substr(space + 1);
  while (!version.empty() && (version.back() == '\n' || version.back() == '\r')) version.pop_back();
  return version;
}

}  // namespace

// ---- (a) the audit log ------------------------------------------------------------------------

TEST_CASE("audit: key operations and failures are JSON lines naming the caller",
          "[observability][audit]") {
  RunningAgent env;
  const Bytes data = to_bytes("observability payload 6f1e2d");  // must never reach the log
  const Bytes digest = sha256(to_bytes("prehashed by the caller"));
  const std::string odd_kid =
      "odd \"kid\"\\\n\t\x01 caf\xC3\xA9 \xF0\x9F\x94\x91 \",\"result\":\"ok";

  // Reads and metadata succeed unaudited; the key operations and every failure are audited.
  (void)env.client.capabilities();
  (void)env.client.health();
  env.client.generate_key("audit-a");
  (void)env.client.list_keys();
  (void)env.client.get_public_key("audit-a");
  (void)env.client.get_jwks();
  const Bytes signature = env.client.sign("audit-a", data);
  const Bytes digest_signature = env.client.sign_digest("audit-a", digest);
  CHECK(env.client.verify("audit-a", data, signature));
  CHECK(error_code_of([&] { (void)env.client.sign("audit-missing", data); }) == "not_found");
  CHECK(error_code_of([&] { (void)env.client.sign(odd_kid, data); }) == "not_found");
  CHECK(env.client.delete_key("audit-a"));
  CHECK(error_code_of([&] { (void)env.client.get_public_key("audit-a"); }) == "not_found");

  const std::vector<ExpectedAudit> expected = {
      {"generate_key", "audit-a", "ok", "ES256", std::nullopt},
      {"sign", "audit-a", "ok", "ES256", data},
      {"sign", "audit-a", "ok", "ES256", digest},  // the digest the caller sent, hashed
      {"verify", "audit-a", "ok", std::nullopt, std::nullopt},
      {"sign", "audit-missing", "not_found", std::nullopt, data},
      {"sign", odd_kid, "not_found", std::nullopt, data},  // any bytes, still one valid line
      {"delete_key", "audit-a", "ok", std::nullopt, std::nullopt},
      {"get_public_key", "audit-a", "not_found", std::nullopt, std::nullopt},
  };
  const auto lines = wait_for_json_lines([&] { return env.agent.stdout_text(); }, expected.size());
  check_audit_lines(lines, expected);

  // The data and the signatures themselves never appear, in any form we can think of.
  const std::string out = env.agent.stdout_text();
  CHECK(out.find("observability payload") == std::string::npos);
  CHECK(out.find(hex(data)) == std::string::npos);
  CHECK(out.find(hex(digest)) == std::string::npos);
  CHECK(out.find(base64url_encode(signature)) == std::string::npos);
  CHECK(out.find(base64url_encode(digest_signature)) == std::string::npos);
  // stdout is the audit log only: nothing else is written there.
  CHECK(env.agent.stderr_text().find(R"("event":"request")") == std::string::npos);
}

TEST_CASE("audit: requests a read-only agent refuses are audited as permission_denied",
          "[observability][audit]") {
  SoftHsmToken token;
  AgentProcess agent(token, AgentOptions{.extra_args = {"--read-only"}});
  hsm::Client client(agent.socket_path());
  CHECK(error_code_of([&] { client.generate_key("ro-new"); }) == "permission_denied");
  CHECK(error_code_of([&] { (void)client.delete_key("ro-old"); }) == "permission_denied");
  // A worker-answered failure last: once its line is there, every earlier one is too.
  CHECK(error_code_of([&] { (void)client.sign("ro-missing", to_bytes("x")); }) == "not_found");

  const auto lines = wait_for_json_lines([&] { return agent.stdout_text(); }, 3);
  check_audit_lines(lines,
                    {{"generate_key", "ro-new", "permission_denied", std::nullopt, std::nullopt},
                     {"delete_key", "ro-old", "permission_denied", std::nullopt, std::nullopt},
                     {"sign", "ro-missing", "not_found", std::nullopt, to_bytes("x")}});
  CHECK_FALSE(lines[0].has("alg"));
  const Scrape scrape(agent);
  CHECK(scrape.value("hsm_agent_requests_total",
                     {{"method", "generate_key"}, {"code", "permission_denied"}}) == 1);
  CHECK(scrape.value("hsm_agent_requests_total",
                     {{"method", "delete_key"}, {"code", "permission_denied"}}) == 1);
}

TEST_CASE("audit: policy denials and refused connections are audited with the peer",
          "[observability][audit]") {
  SoftHsmToken token;
  TempDir dir("hsm-obs");
  const auto me = std::to_string(::getuid());
  const auto someone_else = std::to_string(::getuid() + 1);

  SECTION("a request the policy does not grant") {
    const auto policy = dir.path() / "policy.yaml";
    write_text(policy,
               "rules:\n"
               "  - name: observability-test\n"
               "    match: { uids: [" +
                   me +
                   "] }\n"
                   "    methods: [generate_key, sign, health, capabilities]\n"
                   "    kids: [\"pol-*\"]\n");
    ::chmod(policy.c_str(), 0600);
    AgentProcess agent(token, AgentOptions{.extra_args = {"--policy", policy.string()}});
    hsm::Client client(agent.socket_path());
    client.generate_key("pol-a");
    CHECK(error_code_of([&] { (void)client.sign("other-b", to_bytes("x")); }) ==
          "permission_denied");
    (void)client.sign("pol-a", to_bytes("y"));

    const auto lines = wait_for_json_lines([&] { return agent.stdout_text(); }, 3);
    REQUIRE(lines.size() == 3);
    for (const auto& line : lines) {
      REQUIRE(line.ok());
      CHECK(line.integer("peer.uid") == me);
    }
    CHECK(lines[1].str("method") == "sign");
    CHECK(lines[1].str("kid") == "other-b");
    CHECK(lines[1].str("result") == "permission_denied");
    CHECK(lines[2].str("kid") == "pol-a");
    CHECK(lines[2].str("result") == "ok");
  }

  SECTION("a caller the policy does not admit at all") {
    const auto policy = dir.path() / "policy.yaml";
    write_text(policy,
               "rules:\n"
               "  - match: { uids: [" +
                   someone_else +
                   "] }\n"
                   "    methods: [health]\n");
    ::chmod(policy.c_str(), 0600);
    AgentProcess agent(token, AgentOptions{.extra_args = {"--policy", policy.string()}});
    auto client = client_for(agent, 2s, 1);
    CHECK(error_code_of([&] { (void)client.health(); }) != "no error");

    // The fixture's own readiness checks connect too: every refused connection, and only
    // those, is counted by a connection_refused line (a line stands for the refusals of its uid
    // since the previous one: at most one a second), and the counter agrees with the log.
    std::vector<JsonLine> lines;
    double rejected = 0;
    const bool settled = wait_until([&] {
      rejected = metric(agent, "hsm_agent_connections_rejected_total", {{"reason", "policy"}});
      lines = judge_json_lines(complete_lines(agent.stdout_text()));
      double counted = 0;
      for (const auto& line : lines) counted += line.number("count");
      return rejected >= 1 && counted == rejected;
    });
    REQUIRE(settled);
    CHECK(lines.size() <= static_cast<std::size_t>(rejected));
    for (const auto& line : lines) {
      REQUIRE(line.ok());
      CHECK(line.str("event") == "connection_refused");
      CHECK(line.str("result") == "permission_denied");
      CHECK(line.number("count") >= 1);
      CHECK(std::regex_match(line.str("time"), kRfc3339Utc));
      CHECK(line.integer("peer.uid") == me);
      CHECK(line.integer("peer.gid") == std::to_string(::getgid()));
      CHECK_FALSE(line.has("method"));
    }
    // The refusal by this test's client (not only the fixture's probes) is among them.
    CHECK(std::any_of(lines.begin(), lines.end(), [](const JsonLine& line) {
      return line.integer("peer.pid") == std::to_string(::getpid());
    }));
  }
}

// ---- (b) --audit-log FILE and SIGHUP
// -------------------------------------------------------------

TEST_CASE("audit: --audit-log FILE is reopened on SIGHUP after rotation, nothing lost",
          "[observability][audit]") {
  TempDir dir("hsm-obs");
  const auto path = dir.path() / "audit.log";
  const auto rotated = dir.path() / "audit.log.1";
  const auto rotated_again = dir.path() / "audit.log.2";
  RunningAgent env(AgentOptions{.extra_args = {"--audit-log", path.string()}});
  std::vector<Bytes> signed_inputs;
  auto sign = [&](int i) {
    signed_inputs.push_back(to_bytes("rotation " + std::to_string(i)));
    (void)env.client.sign("rot", signed_inputs.back());
  };

  env.client.generate_key("rot");
  for (int i = 0; i < 3; ++i) sign(i);
  auto lines = wait_for_json_lines([&] { return read_text(path); }, 4);
  CHECK(lines.size() == 4);
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  // logrotate's default: rename, then signal. Lines written in between still go to the open,
  // renamed file.
  std::filesystem::rename(path, rotated);
  for (int i = 3; i < 5; ++i) sign(i);
  CHECK(wait_until([&] { return count_lines(read_text(rotated)) == 6; }));
  env.agent.signal(SIGHUP);
  // The reopen runs off the event loop: done once it says so (the new file exists earlier).
  REQUIRE(wait_until(
      [&] { return env.agent.stderr_text().find("audit log reopened") != std::string::npos; }));
  REQUIRE(std::filesystem::exists(path));
  for (int i = 5; i < 8; ++i) sign(i);
  const auto fresh = wait_for_json_lines([&] { return read_text(path); }, 3);
  const auto old = judge_json_lines(read_text(rotated));
  CHECK(old.size() == 6);
  CHECK(fresh.size() == 3);
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  // Together, in order: the generate_key and every sign exactly once.
  std::vector<JsonLine> all = old;
  all.insert(all.end(), fresh.begin(), fresh.end());
  std::vector<ExpectedAudit> expected = {{"generate_key", "rot", "ok", "ES256", std::nullopt}};
  for (const auto& input : signed_inputs) expected.push_back({"sign", "rot", "ok", "ES256", input});
  check_audit_lines(all, expected);
  CHECK(env.agent.stdout_text().empty());  // with --audit-log, stdout carries nothing

  SECTION("a reopen that fails keeps the old file and loses nothing") {
    std::filesystem::rename(path, rotated_again);
    std::filesystem::create_directory(path);  // cannot be opened as a file
    env.agent.signal(SIGHUP);
    REQUIRE(wait_until([&] {
      return env.agent.stderr_text().find("cannot reopen audit log") != std::string::npos;
    }));
    (void)env.client.sign("rot", to_bytes("after a failed reopen"));
    const auto kept = wait_for_json_lines([&] { return read_text(rotated_again); }, 4);
    REQUIRE(kept.size() == 4);
    CHECK(kept[3].str("input_sha256") == hex(sha256(to_bytes("after a failed reopen"))));
    CHECK(env.client.health().ok);
  }
}

// ---- (c) --log-format json ----------------------------------------------------------------------

TEST_CASE("logs: with --log-format json every stderr line is a JSON object: time, level, msg",
          "[observability][logs]") {
  RunningAgent env(AgentOptions{.extra_args = {"--log-format", "json"}});
  // Work that logs at several levels (the fixture runs the agent at --log-level debug), with
  // untrusted text in it: a kid full of quotes and control bytes, garbage on the socket.
  env.client.generate_key("log-k");
  (void)env.client.sign("log-k", to_bytes("x"));
  CHECK(error_code_of([&] { (void)env.client.sign("log \"odd\"\n\x01 kid", to_bytes("x")); }) ==
        "not_found");
  {
    auto attacker = env.connect();
    attacker.send(std::string("\xc1\xc1 not msgpack", 14));
    CHECK(attacker.closed_by_peer());
  }
  env.agent.signal(SIGHUP);
  CHECK(wait_until([&] { return env.agent.stderr_text().find("SIGHUP") != std::string::npos; }));
  const auto status = env.agent.stop();
  CHECK(status.exited);
  CHECK(status.code == 0);

  const std::string text = env.agent.stderr_text();
  REQUIRE(!text.empty());
  CHECK(text.back() == '\n');
  const auto lines = judge_json_lines(text);
  const std::set<std::string> levels = {"trace", "debug", "info", "warning", "error", "critical"};
  std::set<std::string> seen_levels;
  bool listening = false, garbage_warned = false, stopped = false;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const auto& line = lines[i];
    INFO("stderr line " << i << ": " << line.error);
    REQUIRE(line.ok());
    CHECK(line.keys() == std::set<std::string>{"time", "level", "msg"});
    CHECK(std::regex_match(line.str("time"), kRfc3339Utc));
    CHECK(levels.count(line.str("level")) == 1);
    seen_levels.insert(line.str("level"));
    const std::string msg = line.str("msg");
    listening = listening || msg.find("listening on") != std::string::npos;
    garbage_warned = garbage_warned ||
                     (line.str("level") == "warning" && msg.find("closed") != std::string::npos);
    stopped = stopped || msg == "stopped";
  }
  CHECK(listening);
  CHECK(garbage_warned);
  CHECK(stopped);
  CHECK(seen_levels.count("debug") == 1);
  CHECK(seen_levels.count("info") == 1);
}

// ---- (d) metrics move ---------------------------------------------------------------------------

TEST_CASE("metrics: request histogram buckets, counters and PKCS#11 calls move with signs",
          "[observability][metrics]") {
  RunningAgent env(AgentOptions{.extra_args = {"--sessions", "4", "--max-sessions", "4"}});
  env.client.generate_key("m");
  const Scrape before(env.agent);
  constexpr int kSigns = 20;
  for (int i = 0; i < kSigns; ++i) (void)env.client.sign("m", to_bytes("m" + std::to_string(i)));
  const Scrape after(env.agent);

  // The documented buckets, 100 µs to 5 s, then +Inf; cumulative; +Inf equals _count.
  const std::vector<double> kBuckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                        0.01,   0.025,   0.1,    0.25,  1.0,    5.0};
  const auto buckets = after.all("hsm_agent_request_duration_seconds_bucket", {{"method", "sign"}});
  REQUIRE(buckets.size() == kBuckets.size() + 1);
  double previous = 0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    const std::string le = buckets[i].labels.at("le");
    if (i < kBuckets.size()) {
      CHECK(std::stod(le) == Approx(kBuckets[i]).epsilon(1e-9));
    } else {
      CHECK(le == "+Inf");
    }
    CHECK(buckets[i].value >= previous);
    previous = buckets[i].value;
  }
  CHECK(buckets.back().value == kSigns);
  CHECK(after.value("hsm_agent_request_duration_seconds_count", {{"method", "sign"}}) == kSigns);
  CHECK(after.value("hsm_agent_request_duration_seconds_sum", {{"method", "sign"}}) > 0);
  // The signing path's methods have their histogram from the start, with the same buckets; the
  // others are counted only (docs/metrics.md, "Series budget").
  for (const auto method : hsm::protocol::all_methods()) {
    const std::string name(hsm::protocol::to_string(method));
    INFO("method " << name);
    const bool timed = method == Method::kSign || method == Method::kSignBatch;
    CHECK(after.all("hsm_agent_request_duration_seconds_bucket", {{"method", name}}).size() ==
          (timed ? kBuckets.size() + 1 : 0));
  }

  CHECK(after.counter("hsm_agent_requests_total", {{"code", "ok"}, {"method", "sign"}}) -
            before.counter("hsm_agent_requests_total", {{"code", "ok"}, {"method", "sign"}}) ==
        kSigns);
  // One C_Sign per sign request, timed by the PKCS#11 call wrapper; sessions were waited for.
  CHECK(
      after.value("hsm_agent_pkcs11_call_duration_seconds_count", {{"function", "C_Sign"}}) -
          before.value("hsm_agent_pkcs11_call_duration_seconds_count", {{"function", "C_Sign"}}) ==
      kSigns);
  CHECK(
      after.all("hsm_agent_pkcs11_call_duration_seconds_bucket", {{"function", "C_Sign"}}).size() ==
      kBuckets.size() + 1);
  // Every function's calls are counted; only the signing path's are timed.
  CHECK(after.value("hsm_agent_pkcs11_calls_total", {{"function", "C_Sign"}}) -
            before.value("hsm_agent_pkcs11_calls_total", {{"function", "C_Sign"}}) ==
        kSigns);
  CHECK(after.value("hsm_agent_pkcs11_calls_total", {{"function", "C_Login"}}) == 1);
  CHECK(after.value("hsm_agent_pkcs11_calls_total", {{"function", "C_Verify"}}) == 0);
  CHECK(after.all("hsm_agent_pkcs11_call_duration_seconds_count", {}).size() == 2);
  CHECK(after.all("hsm_agent_pkcs11_call_duration_seconds_bucket", {{"function", "C_Login"}})
            .empty());
  CHECK(after.value("hsm_agent_session_wait_seconds_count") -
            before.value("hsm_agent_session_wait_seconds_count") >=
        kSigns);

  // At rest: nothing in flight, the whole pool idle.
  CHECK(after.value("hsm_agent_requests_in_flight") == 0);
  CHECK(after.value("hsm_agent_sessions", {{"state", "idle"}}) == 4);
  CHECK(after.value("hsm_agent_sessions", {{"state", "busy"}}) == 0);

  // Token health and identity.
  CHECK(after.value("hsm_agent_hsm_up") == 1);
  CHECK(after.value("hsm_agent_logins_total", {{"result", "ok"}}) == 1);
  CHECK(after.value("hsm_agent_build_info", {{"version", agent_version()},
                                             {"module", kSoftHsmModule},
                                             {"token_label", env.token.label()}}) == 1);
  CHECK(after.all("hsm_agent_build_info", {}).size() == 1);
  CHECK(after.value("process_cpu_seconds_total") >= 0);  // may still be 0 ticks
  for (const char* name : {"process_resident_memory_bytes", "process_virtual_memory_bytes",
                           "process_start_time_seconds", "process_open_fds", "process_max_fds"}) {
    INFO(name);
    CHECK(after.value(name) > 0);
  }
}

TEST_CASE("metrics: --metrics-all-histograms times every method and PKCS#11 function",
          "[observability][metrics]") {
  RunningAgent env(AgentOptions{.extra_args = {"--metrics-all-histograms"}});
  (void)env.client.list_keys();
  const Scrape scrape(env.agent);
  for (const auto method : hsm::protocol::all_methods()) {
    const std::string name(hsm::protocol::to_string(method));
    INFO("method " << name);
    CHECK(scrape.all("hsm_agent_request_duration_seconds_bucket", {{"method", name}}).size() == 13);
  }
  CHECK(scrape.all("hsm_agent_pkcs11_call_duration_seconds_count", {}).size() == 21);
  CHECK(scrape.value("hsm_agent_pkcs11_call_duration_seconds_count", {{"function", "C_Login"}}) ==
        scrape.value("hsm_agent_pkcs11_calls_total", {{"function", "C_Login"}}));
  CHECK(scrape.value("hsm_agent_request_duration_seconds_count", {{"method", "list_keys"}}) == 1);
}

TEST_CASE("metrics: in-flight and session gauges while a PKCS#11 call is held, then at rest",
          "[observability][metrics]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(token, faults.agent_options({"--sessions", "3", "--max-sessions", "3",
                                                  "--request-timeout", "120000"}));
  auto client = client_for(agent, 120s);
  client.generate_key("held");
  CHECK(metric(agent, "hsm_agent_requests_in_flight") == 0);

  // The module blocks C_Sign until the rule is removed: one request stays in flight, holding
  // one session.
  faults.set("C_Sign hang=1");
  auto pending = client.sign_async("held", to_bytes("held"));
  CHECK(wait_until([&] {
    const Scrape scrape(agent);
    return scrape.value("hsm_agent_requests_in_flight") == 1 &&
           scrape.value("hsm_agent_sessions", {{"state", "busy"}}) == 1;
  }));
  {
    const Scrape held(agent);
    CHECK(held.value("hsm_agent_sessions", {{"state", "idle"}}) +
              held.value("hsm_agent_sessions", {{"state", "busy"}}) ==
          3);
  }
  faults.clear();
  CHECK(pending.get().signature.size() == 64);
  const Scrape rest(agent);
  CHECK(rest.value("hsm_agent_requests_in_flight") == 0);
  CHECK(rest.value("hsm_agent_sessions", {{"state", "idle"}}) == 3);
  CHECK(rest.value("hsm_agent_sessions", {{"state", "busy"}}) == 0);

  SECTION("many concurrent requests all come back to zero in flight") {
    std::vector<std::future<hsm::Signature>> futures;
    for (int i = 0; i < 64; ++i) futures.push_back(client.sign_async("held", to_bytes("c")));
    for (auto& future : futures) CHECK(future.get().signature.size() == 64);
    const Scrape done(agent);
    CHECK(done.value("hsm_agent_requests_in_flight") == 0);
    CHECK(done.value("hsm_agent_requests_total", {{"code", "ok"}, {"method", "sign"}}) == 65);
    CHECK(done.value("hsm_agent_sessions", {{"state", "busy"}}) == 0);
  }
}

TEST_CASE("metrics: a PKCS#11 error is counted by function and CKR", "[observability][metrics]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(token, faults.agent_options());
  auto client = client_for(agent, 10s, 1);
  client.generate_key("e");
  faults.set("C_Sign rv=CKR_FUNCTION_FAILED count=1");
  std::optional<std::string> ckr;
  try {
    (void)client.sign("e", to_bytes("fails once"));
  } catch (const hsm::Error& e) {
    CHECK(e.code() == "hsm_error");
    ckr = e.ckr();
  }
  CHECK(ckr == std::optional<std::string>("CKR_FUNCTION_FAILED"));
  (void)client.sign("e", to_bytes("works again"));

  const Scrape scrape(agent);
  CHECK(scrape.value("hsm_agent_pkcs11_errors_total",
                     {{"function", "C_Sign"}, {"ckr", "CKR_FUNCTION_FAILED"}}) == 1);
  CHECK(scrape.value("hsm_agent_requests_total", {{"code", "hsm_error"}, {"method", "sign"}}) == 1);
  CHECK(scrape.value("hsm_agent_requests_total", {{"code", "ok"}, {"method", "sign"}}) == 1);
  CHECK(scrape.value("hsm_agent_build_info", {{"version", agent_version()},
                                              {"module", HSM_FAULT_MODULE},
                                              {"token_label", token.label()}}) == 1);
  // The failure is audited like any other.
  const auto lines = wait_for_json_lines([&] { return agent.stdout_text(); }, 3);
  REQUIRE(lines.size() == 3);
  CHECK(lines[1].str("method") == "sign");
  CHECK(lines[1].str("result") == "hsm_error");
  CHECK(lines[1].str("input_sha256") == hex(sha256(to_bytes("fails once"))));
}

TEST_CASE("metrics: connections open and close; garbage counts as a protocol error",
          "[observability][metrics]") {
  RunningAgent env;
  (void)env.client.health();  // the client's own connection is open from here on
  const Scrape base(env.agent);
  const double open_before = base.value("hsm_agent_connections_open");
  const double accepted_before = base.value("hsm_agent_connections_total");
  REQUIRE(open_before >= 1);

  {
    std::vector<std::unique_ptr<RawConnection>> extra;
    for (int i = 0; i < 3; ++i)
      extra.push_back(std::make_unique<RawConnection>(env.agent.socket_path()));
    CHECK(wait_until(
        [&] { return metric(env.agent, "hsm_agent_connections_open") == open_before + 3; }));
    CHECK(metric(env.agent, "hsm_agent_connections_total") >= accepted_before + 3);
  }  // closed here
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_connections_open") == open_before; }));

  const double malformed_before =
      base.counter("hsm_agent_protocol_errors_total", {{"reason", "malformed"}});
  {
    auto attacker = env.connect();
    attacker.send(std::string("\xc1\xc1\xc1 garbage", 11));
    CHECK(attacker.closed_by_peer());
  }
  CHECK(wait_until([&] {
    return metric(env.agent, "hsm_agent_protocol_errors_total", {{"reason", "malformed"}}) ==
           malformed_before + 1;
  }));
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_connections_open") == open_before; }));
}

TEST_CASE("metrics: connections over --max-connections are rejected and counted",
          "[observability][metrics]") {
  SoftHsmToken token;
  AgentProcess agent(token, AgentOptions{.extra_args = {"--max-connections", "1"}});
  // The fixture's readiness probe connected and left; wait for it to be gone.
  REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_connections_open") == 0; }));
  auto first = std::make_unique<RawConnection>(agent.socket_path());
  REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_connections_open") == 1; }));
  RawConnection second(agent.socket_path());
  CHECK(second.closed_by_peer());
  CHECK(wait_until([&] {
    return metric(agent, "hsm_agent_connections_rejected_total", {{"reason", "max_connections"}}) ==
           1;
  }));
  CHECK(metric(agent, "hsm_agent_connections_open") == 1);
  first.reset();
  CHECK(wait_until([&] { return metric(agent, "hsm_agent_connections_open") == 0; }));
}

TEST_CASE("token health: hsm_up, the probe, logins and /readyz follow the token",
          "[observability][metrics][health]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(token, faults.agent_options({"--probe-interval", "1"}));
  auto client = client_for(agent, 5s, 1);
  client.generate_key("h");

  // Healthy: the probe runs (a real call to the token) and says so.
  CHECK(wait_until([&] {
    const Scrape scrape(agent);
    return scrape.value("hsm_agent_hsm_probe_duration_seconds_count") >= 2 &&
           scrape.value("hsm_agent_hsm_up") == 1;
  }));
  CHECK(agent.http_get("/readyz").first == 200);
  CHECK(agent.http_get("/healthz").first == 200);

  // The token goes away: the probe fails, hsm_up drops, /readyz says why in one line.
  faults.set("* rv=CKR_DEVICE_REMOVED");
  CHECK(wait_until([&] { return metric(agent, "hsm_agent_hsm_up") == 0; }, 30s));
  CHECK(wait_until([&] { return agent.http_get("/readyz").first == 503; }));
  const auto not_ready = agent.http_get("/readyz");
  CHECK(not_ready.first == 503);
  CHECK(not_ready.second.find('\n') == not_ready.second.size() - 1);  // one line
  CHECK(not_ready.second.find("CKR_DEVICE_REMOVED") != std::string::npos);
  CHECK(agent.http_get("/healthz").first == 200);  // the agent itself is alive
  CHECK(metric(agent, "hsm_agent_pkcs11_errors_total",
               {{"function", "C_GetSessionInfo"}, {"ckr", "CKR_DEVICE_REMOVED"}}) >= 1);
  CHECK(error_code_of([&] { (void)client.sign("h", to_bytes("down")); }) == "hsm_unavailable");

  // It comes back: the agent re-initialises and logs in again by itself.
  faults.clear();
  CHECK(wait_until(
      [&] {
        const Scrape scrape(agent);
        return scrape.value("hsm_agent_hsm_up") == 1 &&
               scrape.value("hsm_agent_logins_total", {{"result", "ok"}}) >= 2;
      },
      60s));
  CHECK(wait_until([&] { return agent.http_get("/readyz").first == 200; }, 30s));
  (void)client.sign("h", to_bytes("up again"));

  // The request refused while the token was down is audited too.
  const auto lines = wait_for_json_lines([&] { return agent.stdout_text(); }, 3);
  REQUIRE(lines.size() == 3);
  CHECK(lines[1].str("result") == "hsm_unavailable");
  CHECK(lines[2].str("result") == "ok");
}

// ---- (e) promtool -----------------------------------------------------------------------------

TEST_CASE("promtool accepts /metrics after a varied workload; labels stay bounded",
          "[observability][metrics][promtool]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(
      token, faults.agent_options({"--sessions", "2", "--max-sessions", "2", "--max-message-bytes",
                                   "4096", "--max-connections", "3"}));
  auto client = client_for(agent, 30s, 1);

  // Every algorithm the token offers: generate, sign, verify good and bad.
  const auto caps = client.capabilities();
  REQUIRE(!caps.supported_algs.empty());
  for (const auto& alg : caps.supported_algs) {
    const std::string kid = "wl-" + alg;
    client.generate_key(kid, alg);
    const Bytes data = to_bytes("workload " + alg);
    const Bytes signature = client.sign(kid, data);
    CHECK(client.verify(kid, data, signature));
    CHECK_FALSE(client.verify(kid, to_bytes("other data"), signature));
  }
  (void)client.health();
  (void)client.list_keys();
  (void)client.get_jwks();
  (void)client.get_public_key("wl-" + caps.supported_algs.back());
  CHECK(client.delete_key("wl-" + caps.supported_algs.front()));
  CHECK_FALSE(client.delete_key("wl-never-existed"));
  CHECK(error_code_of([&] { (void)client.sign("wl-missing", to_bytes("x")); }) == "not_found");
  faults.set("C_Sign rv=CKR_FUNCTION_FAILED count=1");
  CHECK(error_code_of([&] {
          (void)client.sign("wl-" + caps.supported_algs.back(), to_bytes("x"));
        }) == "hsm_error");
  faults.clear();

  {  // a batch, a bad-params request and an unknown method, over a raw connection
    RawConnection raw(agent.socket_path());
    hsm::protocol::SignBatchParams batch;
    for (int i = 0; i < 3; ++i) {
      hsm::protocol::SignParams item;
      item.kid = "wl-" + caps.supported_algs.back();
      item.input = hsm::protocol::Data{to_bytes("batch " + std::to_string(i))};
      batch.items.push_back(item);
    }
    REQUIRE(raw.send(hsm::protocol::Request{1, Method::kSignBatch, batch, std::nullopt}));
    CHECK(raw.receive_response(Method::kSignBatch).has_value());
    hsm::protocol::SignParams empty_kid;
    empty_kid.input = hsm::protocol::Data{to_bytes("x")};
    REQUIRE(raw.send(hsm::protocol::Request{2, Method::kSign, empty_kid, std::nullopt}));
    CHECK(raw.receive_response(Method::kSign).has_value());
    // import_key: keys are made inside the token, so this is the eleventh method and an error.
    REQUIRE(raw.send(
        hsm::protocol::Request{4, Method::kImportKey, hsm::protocol::EmptyParams{}, std::nullopt}));
    CHECK(raw.receive_response(Method::kImportKey).has_value());
  }
  {  // garbage, and a message over --max-message-bytes
    RawConnection garbage(agent.socket_path());
    garbage.send(std::string("\xc1 garbage", 9));
    CHECK(garbage.closed_by_peer());
    RawConnection large(agent.socket_path());
    hsm::protocol::SignParams big;
    big.kid = "wl-big";
    big.input = hsm::protocol::Data{Bytes(8192, 0x42)};
    msgpack::sbuffer buffer;
    hsm::protocol::encode_request({3, Method::kSign, big, std::nullopt}, buffer);
    large.send(std::string_view(buffer.data(), buffer.size()));
    CHECK(large.closed_by_peer());
  }
  CHECK(wait_until([&] {
    return metric(agent, "hsm_agent_protocol_errors_total", {{"reason", "too_large"}}) == 1;
  }));
  {  // one connection over --max-connections (the client holds the first of the three)
    REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_connections_open") == 1; }));
    RawConnection second(agent.socket_path());
    RawConnection third(agent.socket_path());
    REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_connections_open") == 3; }));
    RawConnection refused(agent.socket_path());
    CHECK(refused.closed_by_peer());
  }
  CHECK(wait_until([&] {
    return metric(agent, "hsm_agent_connections_rejected_total", {{"reason", "max_connections"}}) ==
           1;
  }));

  const Scrape scrape(agent);
  TempDir dir("hsm-obs");
  const auto file = dir.path() / "metrics.txt";
  write_text(file, scrape.text());
  const auto [code, output] = run_command("promtool check metrics < '" + file.string() + "'");
  INFO(output);
  CHECK(code == 0);

  // Every family of the catalogue (docs/metrics.md) is exposed, with its type.
  for (const auto& [name, type] : kCatalogue) {
    INFO(name);
    CHECK(scrape.text().find("\n# TYPE " + name + " " + type + "\n") != std::string::npos);
  }

  // Bounded labels: each label takes values from a fixed set; never a kid, pid or message.
  std::set<std::string> methods, codes, functions;
  for (const auto method : hsm::protocol::all_methods()) {
    methods.insert(std::string(hsm::protocol::to_string(method)));
  }
  codes.insert("ok");
  for (const auto c : hsm::protocol::all_error_codes())
    codes.insert(std::string(hsm::protocol::to_string(c)));
  const std::regex pkcs11_function(R"(C_[A-Za-z]+)");
  const std::regex ckr_name(R"(CKR_[A-Z0-9_]+)");
  const std::set<std::string> protocol_reasons = {"malformed", "too_large", "limit_exceeded",
                                                  "invalid_request", "unknown_method"};
  for (const auto& sample : scrape.samples()) {
    for (const auto& [label, value] : sample.labels) {
      INFO(sample.name << " " << label << "=" << value);
      CHECK(value.find("wl-") == std::string::npos);
      if (label == "method") CHECK(methods.count(value) == 1);
      if (label == "code") CHECK(codes.count(value) == 1);
      if (label == "function") CHECK(std::regex_match(value, pkcs11_function));
      if (label == "ckr") CHECK(std::regex_match(value, ckr_name));
      if (label == "state") CHECK((value == "idle" || value == "busy"));
      if (label == "result") CHECK((value == "ok" || std::regex_match(value, ckr_name)));
      if (label == "reason" && sample.name == "hsm_agent_protocol_errors_total") {
        CHECK(protocol_reasons.count(value) == 1);
      }
      if (label == "reason" && sample.name == "hsm_agent_connections_rejected_total") {
        CHECK((value == "max_connections" || value == "max_connections_per_uid" ||
               value == "policy" || value == "shutting_down"));
      }
      if (label == "reason" && sample.name == "hsm_agent_connections_closed_total") {
        CHECK((value == "slow_reader" || value == "idle_timeout" || value == "read_timeout"));
      }
    }
  }
  CHECK(scrape.value("hsm_agent_pkcs11_errors_total",
                     {{"function", "C_Sign"}, {"ckr", "CKR_FUNCTION_FAILED"}}) == 1);
  CHECK(scrape.value("hsm_agent_requests_total", {{"code", "ok"}, {"method", "sign_batch"}}) == 1);
  CHECK(scrape.value("hsm_agent_requests_total",
                     {{"code", "invalid_params"}, {"method", "sign"}}) == 1);

  // The series budget (docs/metrics.md, "Series budget"): an agent that has served every method
  // and seen errors stays within it. Every method was served: each has a count.
  for (const auto method : hsm::protocol::all_methods()) {
    const std::string name(hsm::protocol::to_string(method));
    INFO(name);
    double served = 0;
    for (const auto& sample : scrape.all("hsm_agent_requests_total", {{"method", name}})) {
      served += sample.value;
    }
    CHECK(served >= 1);
  }
  std::map<std::string, std::size_t> per_family;
  for (const auto& sample : scrape.samples()) ++per_family[sample.name];
  std::ostringstream counts;
  for (const auto& [name, count] : per_family) counts << name << ' ' << count << '\n';
  INFO("series: " << scrape.samples().size() << "\n" << counts.str());
  CHECK(scrape.samples().size() <= kSeriesBudget);
}

// ---- (f) series at zero from the start, queue wait, slow readers ------------------------------

TEST_CASE("metrics: bounded label sets exist at zero from the first scrape",
          "[observability][metrics]") {
  RunningAgent env;
  const Scrape scrape(env.agent);
  // rate() and the alerts need a zero before the first increment, and promtool/Prometheus need
  // the # TYPE line: the bounded reasons are created when the metrics are declared.
  for (const char* reason :
       {"max_connections", "max_connections_per_uid", "policy", "shutting_down"}) {
    INFO(reason);
    CHECK(scrape.value("hsm_agent_connections_rejected_total", {{"reason", reason}}) == 0);
  }
  for (const char* reason :
       {"malformed", "too_large", "limit_exceeded", "invalid_request", "unknown_method"}) {
    INFO(reason);
    CHECK(scrape.value("hsm_agent_protocol_errors_total", {{"reason", reason}}) == 0);
  }
  for (const char* reason : {"slow_reader", "idle_timeout", "read_timeout"}) {
    INFO(reason);
    CHECK(scrape.value("hsm_agent_connections_closed_total", {{"reason", reason}}) == 0);
  }
  // Every method's success counter exists (no request of any kind was made yet but the
  // fixture's readiness connection).
  for (const auto method : hsm::protocol::all_methods()) {
    const std::string name(hsm::protocol::to_string(method));
    INFO(name);
    CHECK(scrape.value("hsm_agent_requests_total", {{"code", "ok"}, {"method", name}}) == 0);
  }
  CHECK(scrape.value("hsm_agent_queue_wait_seconds_count") == 0);
  CHECK(scrape.all("hsm_agent_queue_wait_seconds_bucket", {}).size() == 13);
  for (const auto& [name, type] : kCatalogue) {
    if (name == "hsm_agent_pkcs11_errors_total") continue;  // no bounded set: CKR x function
    INFO(name);
    CHECK(scrape.text().find("\n# TYPE " + name + " " + type + "\n") != std::string::npos);
  }
}

TEST_CASE("metrics: queue wait measures requests waiting for a worker, not for a session",
          "[observability][metrics]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  // One session, so one worker: a second request waits in the queue while the first is held.
  AgentProcess agent(token, faults.agent_options({"--sessions", "1", "--max-sessions", "1",
                                                  "--request-timeout", "120000"}));
  auto client = client_for(agent, 120s);
  client.generate_key("q");
  const Scrape before(agent);

  faults.set("C_Sign hang=1");
  auto held = client.sign_async("q", to_bytes("held"));
  REQUIRE(wait_until([&] {
    return metric(agent, "hsm_agent_sessions", {{"state", "busy"}}) == 1;
  }));
  auto queued = client.sign_async("q", to_bytes("queued"));
  REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_requests_in_flight") == 2; }));
  // The queued request was read before this point and cannot start before the release below,
  // so its queue wait is at least the time in between, whatever the machine's load.
  const auto seen_queued = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(300ms);
  const auto released = std::chrono::steady_clock::now();
  faults.clear();
  CHECK(held.get().signature.size() == 64);
  CHECK(queued.get().signature.size() == 64);
  const double at_least = std::chrono::duration<double>(released - seen_queued).count();

  const Scrape after(agent);
  CHECK(after.value("hsm_agent_queue_wait_seconds_count") -
            before.value("hsm_agent_queue_wait_seconds_count") ==
        2);
  CHECK(after.value("hsm_agent_queue_wait_seconds_sum") -
            before.value("hsm_agent_queue_wait_seconds_sum") >=
        at_least);
  // The bucket below the wait did not get the queued request.
  const double below = after.value("hsm_agent_queue_wait_seconds_bucket", {{"le", "0.25"}}) -
                       before.value("hsm_agent_queue_wait_seconds_bucket", {{"le", "0.25"}});
  CHECK(below <= 1);
}

TEST_CASE("metrics: a client that never reads its answers is closed and counted as slow_reader",
          "[observability][metrics]") {
  RunningAgent env(AgentOptions{.extra_args = {"--max-write-buffer", "4096"}});
  RawConnection flood(env.agent.socket_path());
  const timeval send_timeout{10, 0};
  ::setsockopt(flood.fd(), SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof(send_timeout));
  // Capabilities are answered on the loop; this client reads none of the answers.
  std::string batch;
  for (std::uint32_t i = 1; i <= 200; ++i) {
    msgpack::sbuffer buffer;
    hsm::protocol::encode_request(
        {i, Method::kCapabilities, hsm::protocol::EmptyParams{}, std::nullopt}, buffer);
    batch.append(buffer.data(), buffer.size());
  }
  for (int round = 0; round < 2000; ++round) {
    if (!flood.send(batch)) break;
    if (metric(env.agent, "hsm_agent_connections_closed_total", {{"reason", "slow_reader"}}) >= 1)
      break;
  }
  CHECK(wait_until([&] {
    return metric(env.agent, "hsm_agent_connections_closed_total", {{"reason", "slow_reader"}}) ==
           1;
  }));
  CHECK(env.client.health().ok);  // others are still served
}

// ---- (g) /readyz while draining, audit lines on every exit path ------------------------------

TEST_CASE("readiness: /readyz answers 503 draining once SIGTERM starts the drain",
          "[observability][health]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(
      token, faults.agent_options({"--shutdown-timeout", "60", "--request-timeout", "120000"}));
  auto client = client_for(agent, 120s, 1);
  client.generate_key("d");
  REQUIRE(wait_until([&] { return agent.http_get("/readyz").first == 200; }, 30s));

  faults.set("C_Sign hang=1");
  auto held = client.sign_async("d", to_bytes("held through the drain"));
  REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_requests_in_flight") == 1; }));
  agent.signal(SIGTERM);
  std::pair<int, std::string> ready;
  CHECK(wait_until([&] {
    ready = agent.http_get("/readyz");
    return ready.first == 503;
  }));
  CHECK(ready.second == "draining\n");
  CHECK(agent.http_get("/healthz").first == 200);  // alive while it drains

  faults.clear();
  CHECK(held.get().signature.size() == 64);  // the drain answers what was in flight
  const auto status = agent.wait_exit(30s);
  REQUIRE(status.has_value());
  CHECK(status->exited);
  CHECK(status->code == 0);
  // The drained sign's audit line was written before the process ended.
  const auto lines = judge_json_lines(complete_lines(agent.stdout_text()));
  REQUIRE(lines.size() == 2);
  CHECK(lines[1].str("method") == "sign");
  CHECK(lines[1].str("result") == "ok");
  CHECK(lines[1].str("input_sha256") == hex(sha256(to_bytes("held through the drain"))));
}

// A service manager's notify socket (sd_notify(3)): a datagram socket the test owns.
class NotifySocket {
 public:
  explicit NotifySocket(const std::filesystem::path& path) : path_(path.string()) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    REQUIRE(path_.size() < sizeof(address.sun_path));
    std::copy(path_.begin(), path_.end(), address.sun_path);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  }
  ~NotifySocket() { ::close(fd_); }
  NotifySocket(const NotifySocket&) = delete;
  NotifySocket& operator=(const NotifySocket&) = delete;

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  /// The next datagram, or nullopt when none came within `timeout`.
  std::optional<std::string> receive(std::chrono::milliseconds timeout) const {
    pollfd ready{fd_, POLLIN, 0};
    if (::poll(&ready, 1, static_cast<int>(timeout.count())) != 1) return std::nullopt;
    std::array<char, 4096> buffer{};
    const auto n = ::recv(fd_, buffer.data(), buffer.size(), 0);
    if (n < 0) return std::nullopt;
    return std::string(buffer.data(), static_cast<std::size_t>(n));
  }
  /// The next datagram that contains `what`, skipping others; nullopt after `timeout`.
  std::optional<std::string> receive_containing(const std::string& what,
                                                std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      auto message = receive(std::max(left, 1ms));
      if (message && message->find(what) != std::string::npos) return message;
    }
    return std::nullopt;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

bool accepts_connections(const std::string& socket_path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::copy(socket_path.begin(), socket_path.end(), address.sun_path);
  const bool connected = ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  ::close(fd);
  return connected;
}

TEST_CASE("systemd: READY=1 once the socket accepts, WATCHDOG=1 while alive, STOPPING=1 on SIGTERM",
          "[observability][health][systemd]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  NotifySocket notify(faults.directory() / "notify.sock");
  faults.set("C_Login hang=1");  // start-up holds in the login until the rule is cleared
  auto options = faults.agent_options();
  options.wait_until_listening = false;
  options.env["NOTIFY_SOCKET"] = notify.path();
  options.env["WATCHDOG_USEC"] = "200000";  // WatchdogSec=0.2s: a ping every 100 ms
  AgentProcess agent(token, options);

  // While start-up is held nothing is announced, and nothing accepts on the socket.
  CHECK_FALSE(notify.receive(1s).has_value());
  CHECK_FALSE(accepts_connections(agent.socket_path()));

  faults.clear();
  const auto first = notify.receive(30s);
  REQUIRE(first.has_value());
  CHECK(first->find("READY=1") != std::string::npos);  // the first message is READY=1
  CHECK(first->find("STATUS=listening on " + agent.socket_path()) != std::string::npos);
  // READY=1 came after the socket started accepting: a client woken by it connects at once.
  CHECK(accepts_connections(agent.socket_path()));
  CHECK(hsm::Client(agent.socket_path()).health().ok);

  // The watchdog: pings keep coming while the loop turns.
  CHECK(notify.receive_containing("WATCHDOG=1", 10s).has_value());
  CHECK(notify.receive_containing("WATCHDOG=1", 10s).has_value());

  agent.signal(SIGTERM);
  const auto stopping = notify.receive_containing("STOPPING=1", 10s);
  REQUIRE(stopping.has_value());
  CHECK(stopping->find("READY=1") == std::string::npos);
  const auto status = agent.wait_exit(30s);
  REQUIRE(status.has_value());
  CHECK(status->exited);
  CHECK(status->code == 0);
}

TEST_CASE("systemd: without NOTIFY_SOCKET the agent runs as before", "[observability][systemd]") {
  // WATCHDOG_USEC alone (no service manager to ping) neither fails nor starts pinging.
  RunningAgent env(AgentOptions{.env = {{"WATCHDOG_USEC", "200000"}}});
  CHECK(env.client.health().ok);
  CHECK(env.agent.stderr_text().find("watchdog") == std::string::npos);
}

TEST_CASE("audit: no line is lost when the agent exits, on any exit path",
          "[observability][audit]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  const std::string path = GENERATE(as<std::string>{}, "drain", "second SIGTERM", "abandoned");
  INFO("exit path: " << path);
  AgentProcess agent(
      token, faults.agent_options({"--sessions", "2", "--max-sessions", "2", "--shutdown-timeout",
                                   path == "abandoned" ? "1" : "60"}));
  auto client = client_for(agent, 60s, 1);
  client.generate_key("x");
  // Many answered signs, the last answers just before the signal: their lines are still in the
  // writer's queue when the exit begins.
  constexpr int kSigns = 400;
  std::vector<std::future<hsm::Signature>> futures;
  for (int i = 0; i < kSigns; ++i) futures.push_back(client.sign_async("x", to_bytes("s")));
  for (auto& future : futures) CHECK(future.get().signature.size() == 64);

  std::optional<std::future<hsm::Signature>> held;
  if (path != "drain") {
    // A sign stuck in the token keeps the drain from finishing by itself.
    faults.set("C_Sign hang=1");
    held = client.sign_async("x", to_bytes("stuck"));
    REQUIRE(wait_until([&] { return metric(agent, "hsm_agent_requests_in_flight") == 1; }));
  }
  agent.signal(SIGTERM);
  if (path == "second SIGTERM") {
    REQUIRE(wait_until([&] { return agent.http_get("/readyz").second == "draining\n"; }));
    agent.signal(SIGTERM);
  }
  const auto status = agent.wait_exit(60s);
  faults.clear();
  REQUIRE(status.has_value());
  CHECK(status->exited);

  // generate_key, every sign; the stuck one is audited only when it was answered.
  const auto lines = judge_json_lines(complete_lines(agent.stdout_text()));
  std::size_t signs_ok = 0;
  for (const auto& line : lines) {
    REQUIRE(line.ok());
    if (line.str("method") == "sign" && line.str("result") == "ok") ++signs_ok;
  }
  CHECK(signs_ok == kSigns);
  CHECK(agent.stdout_text().back() == '\n');
}

// ---- (h) what is audited: refusals, invalid params, sign_batch items ---------------------------

TEST_CASE(
    "audit: invalid params and refused signs are audited; a refused sign has its input's "
    "SHA-256",
    "[observability][audit]") {
  SoftHsmToken token;
  TempDir dir("hsm-obs");
  const auto policy = dir.path() / "policy.yaml";
  write_text(policy,
             "rules:\n"
             "  - match: { uids: [" +
                 std::to_string(::getuid()) +
                 "] }\n"
                 "    methods: [generate_key, sign, sign_batch, health, capabilities]\n"
                 "    kids: [\"pol-*\"]\n");
  ::chmod(policy.c_str(), 0600);
  AgentProcess agent(token, AgentOptions{.extra_args = {"--policy", policy.string()}});
  hsm::Client client(agent.socket_path());
  client.generate_key("pol-a");
  const Bytes refused_input = to_bytes("refused input");
  CHECK(error_code_of([&] { (void)client.sign("other", refused_input); }) == "permission_denied");
  {
    RawConnection raw(agent.socket_path());
    hsm::protocol::SignParams empty_kid;
    empty_kid.input = hsm::protocol::Data{to_bytes("x")};
    REQUIRE(raw.send(hsm::protocol::Request{7, Method::kSign, empty_kid, std::nullopt}));
    const auto answer = raw.receive_response(Method::kSign);
    REQUIRE(answer.has_value());
    const auto* error = std::get_if<hsm::protocol::Error>(&answer->body);
    REQUIRE(error != nullptr);
    CHECK(error->code == hsm::protocol::ErrorCode::kInvalidParams);

    // A batch naming a kid the policy does not grant is refused as a whole.
    hsm::protocol::SignBatchParams batch;
    for (const char* kid : {"pol-a", "other"}) {
      hsm::protocol::SignParams item;
      item.kid = kid;
      item.input = hsm::protocol::Data{to_bytes(std::string("batch ") + kid)};
      batch.items.push_back(item);
    }
    REQUIRE(raw.send(hsm::protocol::Request{8, Method::kSignBatch, batch, std::nullopt}));
    REQUIRE(raw.receive_response(Method::kSignBatch).has_value());
  }
  (void)client.sign("pol-a", to_bytes("last"));

  const auto lines = wait_for_json_lines([&] { return agent.stdout_text(); }, 5);
  REQUIRE(lines.size() == 5);
  for (const auto& line : lines) {
    REQUIRE(line.ok());
    CHECK(line.integer("peer.uid") == std::to_string(::getuid()));
  }
  CHECK(lines[1].str("kid") == "other");
  CHECK(lines[1].str("result") == "permission_denied");
  CHECK(lines[1].str("input_sha256") == hex(sha256(refused_input)));
  CHECK(lines[2].str("method") == "sign");
  CHECK(lines[2].str("kid") == "");
  CHECK(lines[2].str("result") == "invalid_params");
  CHECK_FALSE(lines[2].has("input_sha256"));
  CHECK(lines[3].str("method") == "sign_batch");
  CHECK(lines[3].str("result") == "permission_denied");
  CHECK(lines[3].has("items"));
  CHECK(lines[4].str("result") == "ok");
}

TEST_CASE("audit: sign_batch has one items entry per item: kid, own result, input SHA-256",
          "[observability][audit]") {
  RunningAgent env;
  env.client.generate_key("b-ok");
  RawConnection raw(env.agent.socket_path());
  hsm::protocol::SignBatchParams batch;
  const std::vector<std::pair<std::string, Bytes>> items = {
      {"b-ok", to_bytes("first")}, {"b-missing", to_bytes("second")}, {"b-ok", to_bytes("third")}};
  for (const auto& [kid, data] : items) {
    hsm::protocol::SignParams item;
    item.kid = kid;
    item.input = hsm::protocol::Data{data};
    batch.items.push_back(item);
  }
  REQUIRE(raw.send(hsm::protocol::Request{1, Method::kSignBatch, batch, std::nullopt}));
  REQUIRE(raw.receive_response(Method::kSignBatch).has_value());

  const auto lines = wait_for_json_lines([&] { return env.agent.stdout_text(); }, 2);
  REQUIRE(lines.size() == 2);
  const auto& line = lines[1];
  REQUIRE(line.ok());
  CHECK(line.str("method") == "sign_batch");
  CHECK(line.str("result") == "ok");
  CHECK(line.str("kid") == "");
  // The judge prints a list as hex of its JSON: decode it and judge it again as one line.
  const auto it = line.fields.find("items");
  REQUIRE(it != line.fields.end());
  REQUIRE(it->second.rfind("l:", 0) == 0);
  std::string items_json;
  for (std::size_t i = 2; i + 1 < it->second.size(); i += 2) {
    items_json.push_back(static_cast<char>(std::stoi(it->second.substr(i, 2), nullptr, 16)));
  }
  // Each array element as its own line, judged like any audit line.
  const auto element_lines = [&] {
    TempDir scratch("hsm-obs");
    write_text(scratch.path() / "split.py",
               "import json,sys\nfor o in json.loads(sys.stdin.read()): print(json.dumps(o))\n");
    TempDir input("hsm-obs");
    write_text(input.path() / "items.json", items_json);
    const auto [code, output] =
        run_command("/usr/bin/python3 '" + (scratch.path() / "split.py").string() + "' < '" +
                    (input.path() / "items.json").string() + "'");
    REQUIRE(code == 0);
    return judge_json_lines(output);
  }();
  REQUIRE(element_lines.size() == items.size());
  const std::vector<std::string> results = {"ok", "not_found", "ok"};
  for (std::size_t i = 0; i < items.size(); ++i) {
    INFO("item " << i);
    CHECK(element_lines[i].keys() == std::set<std::string>{"kid", "result", "input_sha256"});
    CHECK(element_lines[i].str("kid") == items[i].first);
    CHECK(element_lines[i].str("result") == results[i]);
    CHECK(element_lines[i].str("input_sha256") == hex(sha256(items[i].second)));
  }
}

// ---- (i) start-up failures through the structured log ------------------------------------------

TEST_CASE("logs: a start-up failure is a JSON line with --log-format json, one plain line else",
          "[observability][logs]") {
  SoftHsmToken token;
  TempDir dir("hsm-obs");
  const std::vector<std::string> args = {"--module",         kSoftHsmModule,
                                         "--token-label",    "no-such-token-label",
                                         "--pin-file",       token.write_pin_file().string(),
                                         "--socket",         (dir.path() / "a.sock").string(),
                                         "--metrics-listen", ""};
  const std::map<std::string, std::string> env = {{"SOFTHSM2_CONF", token.config_path().string()}};

  auto json_args = args;
  json_args.insert(json_args.end(), {"--log-format", "json"});
  const auto json_run = run_agent(json_args, env);
  CHECK(json_run.status.exited);
  CHECK(json_run.status.code == 1);
  REQUIRE(!json_run.err.empty());
  const auto lines = judge_json_lines(complete_lines(json_run.err));
  REQUIRE(!lines.empty());
  for (const auto& line : lines) REQUIRE(line.ok());  // nothing but JSON on stderr
  CHECK(lines.back().str("level") == "critical");
  CHECK(lines.back().str("msg").find("no-such-token-label") != std::string::npos);

  const auto text_run = run_agent(args, env);
  CHECK(text_run.status.code == 1);
  CHECK((text_run.err.find("\nhsm-agent: ") != std::string::npos ||
         text_run.err.rfind("hsm-agent: ", 0) == 0));
  CHECK(text_run.err.find("no-such-token-label") != std::string::npos);
}

// ---- (j) hsmctl metrics
// ---------------------------------------------------------------------------

TEST_CASE("hsmctl metrics summarises a real agent's /metrics and /readyz",
          "[observability][hsmctl]") {
  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(token, faults.agent_options({"--sessions", "4", "--max-sessions", "4"}));
  auto client = client_for(agent, 10s, 1);
  client.generate_key("c");
  constexpr int kSigns = 7;
  for (int i = 0; i < kSigns; ++i) (void)client.sign("c", to_bytes("s" + std::to_string(i)));
  CHECK(error_code_of([&] { (void)client.sign("c-missing", to_bytes("x")); }) == "not_found");
  faults.set("C_Sign rv=CKR_FUNCTION_FAILED count=1");
  CHECK(error_code_of([&] { (void)client.sign("c", to_bytes("x")); }) == "hsm_error");
  faults.clear();
  REQUIRE(wait_until([&] { return agent.http_get("/readyz").first == 200; }));
  const std::string url = "http://127.0.0.1:" + std::to_string(agent.metrics_port()) + "/metrics";
  const std::string hsmctl = std::string("'") + HSMCTL_BINARY + "'";

  const auto [code, text] = run_command(hsmctl + " metrics --metrics-url " + url);
  INFO(text);
  CHECK(code == 0);
  CHECK(text.find("hsm up:        yes\n") != std::string::npos);
  CHECK(text.find("ready:         yes\n") != std::string::npos);
  CHECK(text.find("ok " + std::to_string(kSigns + 1)) != std::string::npos);  // + generate_key
  CHECK(text.find("not_found 1") != std::string::npos);
  CHECK(text.find("hsm_error 1") != std::string::npos);
  CHECK(text.find("(" + std::to_string(kSigns + 2) + " signs since start)") != std::string::npos);
  CHECK(text.find("sessions:      idle 4, busy 0\n") != std::string::npos);
  CHECK(text.find("pkcs11 errors: CKR_FUNCTION_FAILED 1\n") != std::string::npos);
  CHECK(std::regex_search(text, std::regex(R"(sign latency:  p50 [0-9.]+ ms, p99 [0-9.]+ ms)")));

  // --json, with the URL from the environment: one JSON object, judged by Python.
  const auto [json_code, json_text] =
      run_command("HSM_AGENT_METRICS_URL=" + url + " " + hsmctl + " --json metrics");
  INFO(json_text);
  CHECK(json_code == 0);
  const auto lines = judge_json_lines(json_text);
  REQUIRE(lines.size() == 1);
  const auto& json = lines[0];
  REQUIRE(json.ok());
  CHECK(json.fields.at("hsm_up") == "b:1");
  CHECK(json.fields.at("ready") == "b:1");
  CHECK(json.number("requests_by_code.ok") == kSigns + 1);
  CHECK(json.number("requests_by_code.hsm_error") == 1);
  CHECK(json.number("sign.count") == kSigns + 2);
  CHECK(json.number("sign.p99_seconds") > 0);
  CHECK(json.number("sign.p50_seconds") <= json.number("sign.p99_seconds"));
  CHECK(json.number("sessions.idle") == 4);
  CHECK(json.number("pkcs11_errors_by_ckr.CKR_FUNCTION_FAILED") == 1);
  CHECK(json.number("connections.open") >= 1);
  CHECK(json.str("token_label") == token.label());

  // Not ready: the token goes away; hsmctl says so with /readyz's reason.
  faults.set("* rv=CKR_DEVICE_REMOVED");
  CHECK(error_code_of([&] { (void)client.sign("c", to_bytes("down")); }) != "no error");
  REQUIRE(wait_until([&] { return agent.http_get("/readyz").first == 503; }, 30s));
  const auto [down_code, down_text] = run_command(hsmctl + " metrics --metrics-url " + url);
  INFO(down_text);
  CHECK(down_code == 0);
  CHECK(down_text.find("ready:         no (") != std::string::npos);
  faults.clear();

  // Nothing listening: exit code 4 and a clear message.
  const std::string nowhere = "http://127.0.0.1:" + std::to_string(free_tcp_port()) + "/metrics";
  const auto [unreachable_code, unreachable_text] =
      run_command(hsmctl + " metrics --metrics-url " + nowhere);
  CHECK(unreachable_code == 4);
  CHECK(unreachable_text.find("cannot reach the agent's metrics endpoint " + nowhere) !=
        std::string::npos);
  const auto [bad_code, bad_text] = run_command(hsmctl + " metrics --metrics-url ftp://x/");
  CHECK(bad_code == 2);

  // No URL given: hsmctl asks the agent on --socket where its metrics are (capabilities), so it
  // summarises this agent on its own port, not whatever listens on 127.0.0.1:9464.
  CHECK(client.capabilities().metrics_url == std::optional<std::string>(url));
  const std::string unset = "env -u HSM_AGENT_METRICS_URL ";
  const auto [asked_code, asked_text] =
      run_command(unset + hsmctl + " --socket '" + agent.socket_path() + "' metrics");
  INFO(asked_text);
  CHECK(asked_code == 0);
  // kSigns, the not_found, the hsm_error and the sign refused while the token was down.
  CHECK(asked_text.find("(" + std::to_string(kSigns + 3) + " signs since start)") !=
        std::string::npos);
  CHECK(asked_text.find("agent:         " + agent_version() + ", token '" + token.label() + "'") !=
        std::string::npos);
}

TEST_CASE("hsmctl metrics refuses to guess when the agent serves no metrics",
          "[observability][hsmctl]") {
  RunningAgent env(AgentOptions{.metrics = false});
  CHECK_FALSE(env.client.capabilities().metrics_url.has_value());
  const std::string hsmctl = std::string("'") + HSMCTL_BINARY + "'";
  const auto [code, text] = run_command("env -u HSM_AGENT_METRICS_URL " + hsmctl + " --socket '" +
                                        env.agent.socket_path() + "' metrics");
  INFO(text);
  CHECK(code == 2);
  CHECK(text.find("hsmctl: the agent on " + env.agent.socket_path() +
                  " does not say where its metrics are") != std::string::npos);
  CHECK(text.find("give --metrics-url") != std::string::npos);
  // capabilities shows where the metrics are, or none.
  const auto [caps_code, caps_text] =
      run_command(hsmctl + " --socket '" + env.agent.socket_path() + "' caps");
  CHECK(caps_code == 0);
  CHECK(caps_text.find("metrics:           none\n") != std::string::npos);
}

// Fetches /metrics (argv[1]: its URL) with Accept-Encoding argv[2] ("-": no header) and prints
// the Content-Encoding, the Vary header, the bytes received and, gunzipped when gzip, the body.
constexpr const char* kFetchScript = R"PY(
import gzip, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(sys.argv[1])
if sys.argv[2] != "-":
    request.add_header("Accept-Encoding", sys.argv[2])
with opener.open(request, timeout=10) as r:
    body = r.read()
    encoding = r.headers.get("Content-Encoding", "identity")
    vary = r.headers.get("Vary", "")
print(encoding)
print(vary)
print(len(body))
sys.stdout.write((gzip.decompress(body) if encoding == "gzip" else body).decode("utf-8"))
)PY";

TEST_CASE("metrics: /metrics is gzip-compressed when Accept-Encoding asks for it",
          "[observability][metrics][promtool]") {
  RunningAgent env;
  env.client.generate_key("z");
  (void)env.client.sign("z", to_bytes("z"));
  TempDir dir("hsm-obs");
  write_text(dir.path() / "fetch.py", kFetchScript);
  const std::string url =
      "http://127.0.0.1:" + std::to_string(env.agent.metrics_port()) + "/metrics";
  struct Fetched {
    std::string encoding, vary;
    std::size_t bytes = 0;
    std::string text;
  };
  const auto fetch = [&](const std::string& accept) {
    const auto [code, output] =
        run_command("/usr/bin/python3 '" + (dir.path() / "fetch.py").string() + "' '" + url +
                    "' '" + accept + "'");
    INFO(output);
    REQUIRE(code == 0);
    std::istringstream in(output);
    Fetched f;
    std::string bytes;
    std::getline(in, f.encoding);
    std::getline(in, f.vary);
    std::getline(in, bytes);
    f.bytes = std::stoul(bytes);
    f.text = output.substr(static_cast<std::size_t>(in.tellg()));
    return f;
  };
  const auto count_series = [](const std::string& text) {
    std::size_t series = 0;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) series += !line.empty() && line[0] != '#';
    return series;
  };

  const Fetched plain = fetch("-");
  CHECK(plain.encoding == "identity");
  CHECK(plain.vary == "Accept-Encoding");
  CHECK(plain.bytes == plain.text.size());
  for (const char* accept : {"gzip", "deflate, gzip;q=0.5", "*", "X-GZIP"}) {
    INFO(accept);
    const Fetched zipped = fetch(accept);
    CHECK(zipped.encoding == "gzip");
    CHECK(zipped.vary == "Accept-Encoding");
    CHECK(zipped.bytes * 4 < zipped.text.size());  // text compresses well
    CHECK(count_series(zipped.text) == count_series(plain.text));
    CHECK(zipped.text.find("\n# TYPE hsm_agent_requests_total counter\n") != std::string::npos);
  }
  for (const char* accept : {"gzip;q=0", "deflate", "identity", "gzip;q=0.000, br"}) {
    INFO(accept);
    CHECK(fetch(accept).encoding == "identity");
  }
  // promtool judges the decompressed exposition too.
  write_text(dir.path() / "metrics.txt", fetch("gzip").text);
  const auto [code, output] =
      run_command("promtool check metrics < '" + (dir.path() / "metrics.txt").string() + "'");
  INFO(output);
  CHECK(code == 0);
}

// ---- (k) a real Prometheus server scrapes the agent
// ----------------------------------------------

namespace {

constexpr const char* kPrometheusBinary = "/usr/bin/prometheus";

/// A child process (Prometheus) with stdout and stderr in `log`; SIGTERM, then SIGKILL, on
/// destruction.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::filesystem::path& log) {
    std::vector<char*> args;
    for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    const int rc = ::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) pid_ = -1;
  }
  ~ChildProcess() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 500; ++i) {  // up to 10 s
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(20ms);
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  [[nodiscard]] bool started() const noexcept { return pid_ > 0; }
  [[nodiscard]] bool running() const noexcept {
    return pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == 0;
  }

 private:
  pid_t pid_ = -1;
};

// Asks a Prometheus server (argv[1]: its base URL) until the hsm-agent target is up, every family
// of argv[3..] (NAME:TYPE) has series and metadata, and every alerting rule of argv[2] is loaded
// and evaluated healthy, or until argv[...] deadline passes; then prints what it saw, one fact per
// line: "up V", "series NAME COUNT", "type NAME TYPE", "rule NAME HEALTH", "want-rule NAME".
// No proxy: the server is on 127.0.0.1.
constexpr const char* kPrometheusProbeScript = R"PY(
import json, sys, time, urllib.parse, urllib.request, yaml
base, rules_file, deadline_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
families = [f.split(":") for f in sys.argv[4:]]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def api(path, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with opener.open(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(url + ": " + json.dumps(body))
    return body["data"]
with open(rules_file) as f:
    wanted = [r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r]
def look():
    facts, done = [], True
    up = api("/api/v1/query", query='up{job="hsm-agent"}')["result"]
    value = up[0]["value"][1] if up else "none"
    facts.append("up " + value)
    done = done and value == "1"
    for name, kind in families:
        series_name = name + "_bucket" if kind == "histogram" else name
        series = api("/api/v1/series", **{"match[]": series_name + '{job="hsm-agent"}'})
        facts.append("series %s %d" % (name, len(series)))
        meta = api("/api/v1/metadata", metric=name).get(name, [])
        facts.append("type %s %s" % (name, meta[0]["type"] if meta else "none"))
        done = done and len(series) > 0 and bool(meta)
    loaded = {}
    for group in api("/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            loaded[rule["name"]] = rule.get("health", "none")
            facts.append("rule %s %s %s" % (rule["name"], rule.get("health", "none"),
                                            rule.get("type", "none")))
    done = done and all(loaded.get(w) == "ok" for w in wanted)
    return done, facts
end = time.time() + deadline_s
while True:
    try:
        done, facts = look()
    except Exception as e:
        done, facts = False, ["error " + repr(e).replace("\n", " ")]
    if done or time.time() > end:
        break
    time.sleep(0.5)
for w in wanted:
    print("want-rule " + w)
print("\n".join(facts))
)PY";

}  // namespace

TEST_CASE("prometheus: a real Prometheus server scrapes every metric and loads the alert rules",
          "[observability][prometheus]") {
  INFO("Debian's prometheus package provides " << kPrometheusBinary
                                               << " (scripts/install-deps.sh installs it)");
  REQUIRE(std::filesystem::exists(kPrometheusBinary));

  FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  SoftHsmToken token;
  AgentProcess agent(token, faults.agent_options({"--probe-interval", "1"}));
  auto client = client_for(agent, 10s, 1);
  // Work that makes every family have series: requests, a PKCS#11 error, a rejected protocol
  // message (pre-created anyway), and a sign through the queue.
  client.generate_key("p");
  (void)client.sign("p", to_bytes("scraped"));
  faults.set("C_Sign rv=CKR_FUNCTION_FAILED count=1");
  CHECK(error_code_of([&] { (void)client.sign("p", to_bytes("x")); }) == "hsm_error");
  faults.clear();

  TempDir dir("hsm-obs");
  const int port = free_tcp_port();
  const std::string rules = std::string(HSM_SOURCE_DIR) + "/deploy/prometheus/alerts.yaml";
  const auto config = dir.path() / "prometheus.yml";
  write_text(config,
             "global:\n"
             "  scrape_interval: 1s\n"
             "  scrape_timeout: 1s\n"
             "  evaluation_interval: 1s\n"
             "rule_files:\n"
             "  - '" +
                 rules +
                 "'\n"
                 "scrape_configs:\n"
                 "  - job_name: hsm-agent\n"
                 "    static_configs:\n"
                 "      - targets: ['127.0.0.1:" +
                 std::to_string(agent.metrics_port()) + "']\n");
  std::filesystem::create_directory(dir.path() / "data");
  const auto log = dir.path() / "prometheus.log";
  ChildProcess prometheus({kPrometheusBinary, "--config.file=" + config.string(),
                           "--storage.tsdb.path=" + (dir.path() / "data").string(),
                           "--web.listen-address=127.0.0.1:" + std::to_string(port)},
                          log);
  REQUIRE(prometheus.started());

  write_text(dir.path() / "probe.py", kPrometheusProbeScript);
  std::string command = "/usr/bin/python3 '" + (dir.path() / "probe.py").string() +
                        "' http://127.0.0.1:" + std::to_string(port) + " '" + rules + "' 120";
  for (const auto& [name, type] : kCatalogue) command += " " + name + ":" + type;
  const auto [code, output] = run_command(command);
  INFO("probe:\n" << output);
  INFO("prometheus log:\n" << read_text(log));
  REQUIRE(code == 0);
  CHECK(prometheus.running());

  std::set<std::string> facts;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) facts.insert(line);
  CHECK(facts.count("up 1") == 1);
  for (const auto& [name, type] : kCatalogue) {
    INFO(name);
    CHECK(facts.count("type " + name + " " + type) == 1);
    CHECK(facts.count("series " + name + " 0") == 0);
    CHECK(std::any_of(facts.begin(), facts.end(), [&name = name](const std::string& fact) {
      return fact.rfind("series " + name + " ", 0) == 0;
    }));
  }
  std::size_t wanted = 0;
  for (const auto& fact : facts) {
    if (fact.rfind("want-rule ", 0) != 0) continue;
    ++wanted;
    const std::string name = fact.substr(10);
    INFO(name);
    CHECK(facts.count("rule " + name + " ok alerting") == 1);
  }
  CHECK(wanted == 7);
}
