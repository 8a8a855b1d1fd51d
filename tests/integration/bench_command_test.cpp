// `hsmctl bench` against the real agent: the JSON report has the shape bench/run.sh reads, the
// signatures it counts were really made by the agent (its own metrics say so), and failures
// are reported as errors, not as throughput. No timing assertions: only that work happened.
#include <array>
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "fixtures/command.hpp"
#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;

namespace {

struct HsmctlRun {
  int status = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

/// Runs hsmctl against `agent` with `args` (test-controlled strings only); stdout and stderr
/// apart, so that stdout can be parsed as JSON.
HsmctlRun hsmctl(const AgentProcess& agent, const std::string& args) {
  const auto err_file = agent.directory() / "hsmctl.err";
  const std::string command = std::string("'") + HSMCTL_BINARY + "' --socket '" +
                              agent.socket_path() + "' " + args + " 2>'" + err_file.string() + "'";
  auto [status, out] = run_command(command, Capture::kStdout);
  return HsmctlRun{status, std::move(out), read_text(err_file)};
}

/// The value of one sample of the agent's /metrics, 0 when absent.
double metric(const AgentProcess& agent, const std::string& series) {
  const auto [status, text] = agent.http_get("/metrics");
  REQUIRE(status == 200);
  return metric_sample(text, series);
}

constexpr const char* kSignOk = R"(hsm_agent_requests_total{code="ok",method="sign"})";

/// The checks every successful report passes.
void check_report(const nlohmann::json& report) {
  REQUIRE(report.is_object());
  CHECK(report.at("mode") == "agent");
  CHECK(report.at("errors") == 0);
  CHECK_FALSE(report.contains("first_error"));
  CHECK(report.at("ops").get<std::uint64_t>() > 0);
  CHECK(report.at("duration_s").get<double>() > 0);
  CHECK(report.at("throughput_per_s").get<double>() > 0);
  const auto& latency = report.at("latency_us");
  for (const char* key : {"p50", "p90", "p99", "max", "mean"}) {
    INFO(key);
    CHECK(latency.at(key).get<double>() > 0);
  }
  CHECK(latency.at("p50").get<double>() <= latency.at("p90").get<double>());
  CHECK(latency.at("p90").get<double>() <= latency.at("p99").get<double>());
  CHECK(latency.at("p99").get<double>() <= latency.at("max").get<double>());
  CHECK(report.at("cpu_us_per_op").at("client").is_number());
}

}  // namespace

TEST_CASE("hsmctl bench generates its key, signs for the duration and reports JSON", "[bench]") {
  RunningAgent env;
  const double signed_before = metric(env.agent, kSignOk);
  const auto run = hsmctl(env.agent, "--json bench --duration 1 --warmup 0.1");
  INFO(run.out << run.err);
  REQUIRE(run.status == 0);
  const auto report = nlohmann::json::parse(run.out);  // one document, nothing else on stdout
  check_report(report);
  CHECK(report.at("kid") == "hsmctl-bench-es256");
  CHECK(report.at("alg") == "ES256");
  CHECK(report.at("key_generated") == true);
  CHECK(report.at("payload") == "data");
  CHECK(report.at("payload_bytes") == 32);
  CHECK(report.at("connections") == 1);
  CHECK(report.at("depth") == 1);
  CHECK(report.at("concurrency") == 1);
  CHECK_FALSE(report.at("cpu_us_per_op").contains("server"));

  // The key is a real ES256 key of the agent, and every counted signature was made by it (the
  // agent also made the probe and the warm-up's).
  CHECK(env.client.get_public_key("hsmctl-bench-es256").alg == "ES256");
  CHECK(metric(env.agent, kSignOk) - signed_before >= report.at("ops").get<double>() + 1);
}

TEST_CASE("hsmctl bench pipelines digests over several connections with an existing key",
          "[bench]") {
  RunningAgent env;
  env.client.generate_key("load-key", std::string("ES384"));
  const auto run = hsmctl(env.agent,
                          "bench load-key --json --connections 2 --depth 4 --digest --duration 1 "
                          "--warmup 0 --server-pid " +
                              std::to_string(env.agent.pid()));
  INFO(run.out << run.err);
  REQUIRE(run.status == 0);
  const auto report = nlohmann::json::parse(run.out);
  check_report(report);
  CHECK(report.at("kid") == "load-key");
  CHECK(report.at("alg") == "ES384");
  CHECK(report.at("key_generated") == false);
  CHECK(report.at("payload") == "digest");
  CHECK(report.at("payload_bytes") == 48);  // SHA-384
  CHECK(report.at("connections") == 2);
  CHECK(report.at("depth") == 4);
  CHECK(report.at("concurrency") == 8);
  // The agent's CPU per signature is reported (/proc counts in 10 ms ticks: on a loaded machine
  // a short run may round to 0, so only its presence and sign are checked).
  CHECK(report.at("cpu_us_per_op").at("server").get<double>() >= 0);
}

TEST_CASE("hsmctl bench prints a text summary", "[bench]") {
  RunningAgent env;
  const auto run = hsmctl(env.agent, "bench --duration 0.5 --warmup 0");
  INFO(run.out << run.err);
  REQUIRE(run.status == 0);
  for (const char* line : {"key         hsmctl-bench-es256 (ES256, generated)", "throughput",
                           "latency us  p50 ", "(0 errors)"}) {
    INFO(line);
    CHECK(run.out.find(line) != std::string::npos);
  }
}

TEST_CASE("hsmctl bench does not create a named key it was not asked to create", "[bench]") {
  RunningAgent env;
  const auto run = hsmctl(env.agent, "--json bench no-such-key --duration 1");
  INFO(run.out << run.err);
  CHECK(run.status == 3);  // the agent answered with an error
  CHECK(run.err.find("not_found") != std::string::npos);
  CHECK(env.client.list_keys().empty());

  const auto created = hsmctl(env.agent,
                              "--json bench new-key --create-key --alg EdDSA "
                              "--data-bytes 100 --duration 0.5 --warmup 0");
  INFO(created.out << created.err);
  REQUIRE(created.status == 0);
  const auto report = nlohmann::json::parse(created.out);
  check_report(report);
  CHECK(report.at("alg") == "EdDSA");
  CHECK(report.at("payload_bytes") == 100);
  CHECK(env.client.get_public_key("new-key").alg == "EdDSA");

  // EdDSA signs whole messages: --digest is a usage error, found before any load.
  const auto digest = hsmctl(env.agent, "bench new-key --digest --duration 0.5");
  CHECK(digest.status == 2);
  CHECK(digest.err.find("--digest") != std::string::npos);
}
