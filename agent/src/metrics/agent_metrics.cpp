#include "metrics/agent_metrics.hpp"

#include <algorithm>
#include <cmath>

namespace hsm::agent {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// 1-2.5-5 steps from 100 µs to 25 ms, where a local token (tens to hundreds of µs) and a
// network HSM (milliseconds) answer, then the alerts' thresholds (100 ms queue wait, 250 ms sign
// p99), 1 s, and 5 s (the probe's hang limit, the default request deadline). Twelve: every
// histogram series costs 15 series (buckets, +Inf, sum, count) on every pod.
Histogram::BucketBoundaries make_latency_buckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0, 5.0};
}

}  // namespace

const Histogram::BucketBoundaries& latency_buckets() {
  static const Histogram::BucketBoundaries buckets = make_latency_buckets();
  return buckets;
}

AgentMetrics::AgentMetrics(prometheus::Registry& registry, bool all_histograms)
    : requests_total(BuildCounter()
                         .Name("hsm_agent_requests_total")
                         .Help("Requests answered, by method and result code (ok or an error)")
                         .Register(registry)),
      request_duration_seconds(BuildHistogram()
                                   .Name("hsm_agent_request_duration_seconds")
                                   .Help("Time from a request's decoding to its answer, by method")
                                   .Register(registry)),
      requests_in_flight(BuildGauge()
                             .Name("hsm_agent_requests_in_flight")
                             .Help("Requests received and not yet answered")
                             .Register(registry)
                             .Add({})),
      pkcs11_calls_total(BuildCounter()
                             .Name("hsm_agent_pkcs11_calls_total")
                             .Help("PKCS#11 calls made, by function (failed ones included)")
                             .Register(registry)),
      pkcs11_call_duration_seconds(
          BuildHistogram()
              .Name("hsm_agent_pkcs11_call_duration_seconds")
              .Help("Duration of PKCS#11 calls, by function (those of the signing path, or every "
                    "one with --metrics-all-histograms)")
              .Register(registry)),
      pkcs11_errors_total(BuildCounter()
                              .Name("hsm_agent_pkcs11_errors_total")
                              .Help("PKCS#11 calls that returned an error, by function and CKR")
                              .Register(registry)),
      sessions(BuildGauge()
                   .Name("hsm_agent_sessions")
                   .Help("PKCS#11 sessions in the pool, by state")
                   .Register(registry)),
      sessions_idle(sessions.Add({{"state", "idle"}})),
      sessions_busy(sessions.Add({{"state", "busy"}})),
      sessions_limit(BuildGauge()
                         .Name("hsm_agent_sessions_limit")
                         .Help("The most PKCS#11 sessions the pool may open now (--max-sessions, "
                               "lowered to the token's limit)")
                         .Register(registry)
                         .Add({})),
      session_wait_seconds(BuildHistogram()
                               .Name("hsm_agent_session_wait_seconds")
                               .Help("Time a request waited for a pooled session")
                               .Register(registry)
                               .Add({}, latency_buckets())),
      queue_wait_seconds(BuildHistogram()
                             .Name("hsm_agent_queue_wait_seconds")
                             .Help("Time from a request being read to its token work starting")
                             .Register(registry)
                             .Add({}, latency_buckets())),
      loop_hand_overs_total(
          BuildCounter()
              .Name("hsm_agent_loop_hand_overs_total")
              .Help(
                  "Inline calls that overstayed, so their worker loop was handed to another thread")
              .Register(registry)
              .Add({})),
      busy_poll_seconds(BuildCounter()
                            .Name("hsm_agent_busy_poll_seconds_total")
                            .Help("Time worker loops spent polling for requests without finding "
                                  "any (--busy-poll-us; 0 when off)")
                            .Register(registry)
                            .Add({})),
      hsm_up(BuildGauge()
                 .Name("hsm_agent_hsm_up")
                 .Help("1 when the last token probe succeeded, else 0")
                 .Register(registry)
                 .Add({})),
      hsm_probe_duration_seconds(BuildHistogram()
                                     .Name("hsm_agent_hsm_probe_duration_seconds")
                                     .Help("Duration of the background token probe")
                                     .Register(registry)
                                     .Add({}, latency_buckets())),
      logins_total(BuildCounter()
                       .Name("hsm_agent_logins_total")
                       .Help("C_Login attempts, by result (ok or the CKR name)")
                       .Register(registry)),
      // Not hsm_agent_connections: under OpenMetrics that is the family name of the counter
      // hsm_agent_connections_total, and the two would collide.
      connections(BuildGauge()
                      .Name("hsm_agent_connections_open")
                      .Help("Client connections open now")
                      .Register(registry)
                      .Add({})),
      connections_total(BuildCounter()
                            .Name("hsm_agent_connections_total")
                            .Help("Client connections accepted")
                            .Register(registry)
                            .Add({})),
      connections_rejected_total(BuildCounter()
                                     .Name("hsm_agent_connections_rejected_total")
                                     .Help("Connections closed at accept, by reason")
                                     .Register(registry)),
      protocol_errors_total(BuildCounter()
                                .Name("hsm_agent_protocol_errors_total")
                                .Help("Connections closed for protocol violations, by reason")
                                .Register(registry)),
      connections_closed_total(BuildCounter()
                                   .Name("hsm_agent_connections_closed_total")
                                   .Help("Admitted connections the agent closed, by reason")
                                   .Register(registry)),
      connections_closed_slow_reader(connections_closed_total.Add({{"reason", "slow_reader"}})),
      connections_closed_idle(connections_closed_total.Add({{"reason", "idle_timeout"}})),
      connections_closed_read_timeout(connections_closed_total.Add({{"reason", "read_timeout"}})),
      buffered_bytes(BuildGauge()
                         .Name("hsm_agent_buffered_bytes")
                         .Help("Bytes held for callers: incomplete messages, requests, unsent "
                               "answers")
                         .Register(registry)
                         .Add({})),
      buffered_bytes_limit(BuildGauge()
                               .Name("hsm_agent_buffered_bytes_limit")
                               .Help("The memory budget for bytes held for callers "
                                     "(--max-buffered-bytes)")
                               .Register(registry)
                               .Add({})),
      memory_budget_waits_total(BuildCounter()
                                    .Name("hsm_agent_memory_budget_waits_total")
                                    .Help("Times a connection stopped reading because the memory "
                                          "budget had no room for it")
                                    .Register(registry)
                                    .Add({})),
      audit_dropped_lines_total(
          BuildCounter()
              .Name("hsm_agent_audit_dropped_lines_total")
              .Help("Audit lines lost: the writer's queue was full, or they were unwritten at exit")
              .Register(registry)
              .Add({})),
      audit_write_errors_total(BuildCounter()
                                   .Name("hsm_agent_audit_write_errors_total")
                                   .Help("Writes to the audit log that failed, retries included")
                                   .Register(registry)
                                   .Add({})),
      audit_failing(BuildGauge()
                        .Name("hsm_agent_audit_failing")
                        .Help("1 while the audit log cannot be written (key operations refused "
                              "unless --audit-fail-open), else 0")
                        .Register(registry)
                        .Add({})),
      build_info(BuildGauge()
                     .Name("hsm_agent_build_info")
                     .Help("Always 1; labels tell the agent version, PKCS#11 module and token")
                     .Register(registry)),
      pkcs11{.latency_buckets = latency_buckets(),
             .calls_total = pkcs11_calls_total,
             .call_duration_seconds = pkcs11_call_duration_seconds,
             .all_call_histograms = all_histograms,
             .errors_total = pkcs11_errors_total,
             .logins_total = logins_total,
             .sessions_idle = sessions_idle,
             .sessions_busy = sessions_busy,
             .sessions_limit = sessions_limit,
             .session_wait_seconds = session_wait_seconds} {
  for (const auto method : protocol::all_methods()) {
    const bool timed = all_histograms || std::find(kTimedMethods.begin(), kTimedMethods.end(),
                                                   method) != kTimedMethods.end();
    if (timed) {
      request_histograms_.at(static_cast<std::size_t>(method)) = &request_duration_seconds.Add(
          {{"method", std::string(protocol::to_string(method))}}, latency_buckets());
    }
    (void)request_counter(method, std::nullopt);  // {code="ok"} at zero from the start
  }
  for (const auto reason : kConnectionRejectReasons) {
    connections_rejected_total.Add({{"reason", std::string(reason)}});
  }
  for (const auto reason : kProtocolErrorReasons) {
    protocol_errors_total.Add({{"reason", std::string(reason)}});
  }
  logins_total.Add({{"result", "ok"}});
}

prometheus::Counter& AgentMetrics::request_counter(protocol::Method method,
                                                   std::optional<protocol::ErrorCode> code) {
  const auto m = static_cast<std::size_t>(method);
  const std::size_t c = code ? static_cast<std::size_t>(*code) + 1 : 0;
  auto& slot = request_counters_.at(m).at(c);
  if (auto* counter = slot.load(std::memory_order_acquire)) return *counter;
  // Family::Add returns the same metric for the same labels, so a race here is harmless.
  auto& counter = requests_total.Add(
      {{"method", std::string(protocol::to_string(method))},
       {"code", code ? std::string(protocol::to_string(*code)) : std::string("ok")}});
  slot.store(&counter, std::memory_order_release);
  return counter;
}

void AgentMetrics::observe_request(protocol::Method method, double seconds) {
  if (auto* histogram = request_histograms_.at(static_cast<std::size_t>(method))) {
    histogram->Observe(seconds);
  }
}

}  // namespace hsm::agent
