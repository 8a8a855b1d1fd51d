// /metrics, /healthz and /readyz of the real agent: counters and histograms move as requests
// succeed and fail, and promtool accepts the exposition.
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <regex>

#include "fixtures/command.hpp"
#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;

TEST_CASE("request metrics move with successes and failures", "[metrics]") {
  RunningAgent env;
  const auto before = env.agent.http_get("/metrics");
  INFO(before.second.substr(0, 200) << "\nagent stderr:\n" << env.agent.stderr_text());
  REQUIRE(before.first == 200);
  env.client.generate_key("m");
  for (int i = 0; i < 5; ++i) (void)env.client.sign("m", std::string_view("x"));
  try {
    (void)env.client.sign("missing", std::string_view("x"));
  } catch (const hsm::Error&) {
  }
  const auto [status, text] = env.agent.http_get("/metrics");
  REQUIRE(status == 200);
  CHECK(metric_sample(text, R"(hsm_agent_requests_total{code="ok",method="sign"})") == 5);
  CHECK(metric_sample(text, R"(hsm_agent_requests_total{code="not_found",method="sign"})") == 1);
  CHECK(metric_sample(text, R"(hsm_agent_requests_total{code="ok",method="generate_key"})") == 1);
  CHECK(metric_sample(text, R"(hsm_agent_request_duration_seconds_count{method="sign"})") == 6);
  CHECK(metric_sample(text, R"(hsm_agent_connections_open)") >= 1);
  CHECK(text.find("hsm_agent_build_info{") != std::string::npos);
  CHECK(text.find("process_resident_memory_bytes") != std::string::npos);

  // promtool is the judge of the exposition format.
  const auto file = env.agent.directory() / "metrics.txt";
  std::ofstream(file) << text;
  const auto promtool = run_command("promtool check metrics < '" + file.string() + "'");
  INFO(promtool.output);
  CHECK(promtool.status == 0);
}

TEST_CASE("liveness and readiness probes", "[metrics]") {
  RunningAgent env;
  const auto health = env.agent.http_get("/healthz");
  CHECK(health.first == 200);
  const auto ready = env.agent.http_get("/readyz");
  CHECK(ready.first == 200);
  CHECK(ready.second.find("ready") != std::string::npos);
}

TEST_CASE("latency mode: --busy-poll-us polls and counts what it costs; off, it never polls",
          "[metrics][busy_poll]") {
  // The counter is what polling cost (polls that found nothing); it moves at a worker's tick.
  const auto polled_after_signs = [](std::vector<std::string> args) {
    RunningAgent env(AgentOptions{.extra_args = std::move(args)});
    env.client.generate_key("p");
    for (int i = 0; i < 20; ++i) (void)env.client.sign("p", std::string_view("x"));
    double polled = -1;
    // Each worker adds its polling time on its 1 s tick.
    wait_until(
        [&] {
          polled = metric_sample(env.agent.http_get("/metrics").second,
                                 "hsm_agent_busy_poll_seconds_total");
          return polled > 0;
        },
        std::chrono::milliseconds(2500));
    return polled;
  };
  CHECK(polled_after_signs({"--busy-poll-us", "200"}) > 0);
  CHECK(polled_after_signs({}) == 0);
}
