// Every metric of hsm-agent, declared once against a registry passed in from outside
// (docs/metrics.md is the catalogue). Components keep a reference to AgentMetrics and update
// the families they own; tests read the same registry.
//
// Thread-safety: prometheus-cpp metrics are thread-safe; Family::Add is internally locked but
// not free, so hot paths cache the metric references they use (see the *_for helpers).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "hsm/protocol/types.hpp"
#include "pkcs11/stats.hpp"

namespace hsm::agent {

/// Request latency buckets: 100 µs to 5 s, 12 of them (docs/metrics.md, "Series budget").
[[nodiscard]] const prometheus::Histogram::BucketBoundaries& latency_buckets();

/// The methods whose latency is a histogram by default: those of the signing path. Every other
/// method is counted (hsm_agent_requests_total), not timed, unless --metrics-all-histograms:
/// a histogram costs 15 series, and every pod with the sidecar multiplies them.
inline constexpr std::array<protocol::Method, 2> kTimedMethods = {protocol::Method::kSign,
                                                                  protocol::Method::kSignBatch};

/// The bounded label values created at zero when the metrics are declared, so that every
/// `# TYPE` line and series exists from the first scrape (rate() and alerts need a zero before
/// the first increment). docs/metrics.md lists them.
inline constexpr std::array<std::string_view, 4> kConnectionRejectReasons = {
    "max_connections", "max_connections_per_uid", "policy", "shutting_down"};
inline constexpr std::array<std::string_view, 5> kProtocolErrorReasons = {
    "malformed", "too_large", "limit_exceeded", "invalid_request", "unknown_method"};

class AgentMetrics {
 public:
  /// `all_histograms` (--metrics-all-histograms): a latency histogram for every method and
  /// every PKCS#11 function, not only those of the signing path (about 470 more series).
  explicit AgentMetrics(prometheus::Registry& registry, bool all_histograms = false);

  // requests
  prometheus::Family<prometheus::Counter>& requests_total;  // {method,code}
  prometheus::Family<prometheus::Histogram>&
      request_duration_seconds;  // {method}, see kTimedMethods
  prometheus::Gauge& requests_in_flight;

  // PKCS#11
  prometheus::Family<prometheus::Counter>& pkcs11_calls_total;  // {function}, every function
  /// {function}: the signing path's functions (pkcs11::kTimedFunctions), or every one.
  prometheus::Family<prometheus::Histogram>& pkcs11_call_duration_seconds;
  prometheus::Family<prometheus::Counter>& pkcs11_errors_total;  // {function,ckr}

  // sessions
  prometheus::Family<prometheus::Gauge>& sessions;  // {state}
  prometheus::Gauge& sessions_idle;
  prometheus::Gauge& sessions_busy;
  /// The most sessions the pool may open now: --max-sessions, lowered to what the token allows.
  prometheus::Gauge& sessions_limit;
  prometheus::Histogram& session_wait_seconds;
  /// Time from a request being read to its token work starting: ~0 inline, else the wait for a
  /// call slot in the blocking pool's queue. With a slot per session the pool may open, this,
  /// not session_wait_seconds, is where requests wait when the agent is saturated.
  prometheus::Histogram& queue_wait_seconds;
  /// Inline calls (run by the worker loop's thread that read them, server/worker.hpp) that
  /// overstayed, so that the watchdog handed that loop to a pool thread: a token call that hung
  /// or ran long.
  prometheus::Counter& loop_hand_overs_total;
  /// Latency mode (--busy-poll-us): CPU time worker loops spent polling without finding work,
  /// the price of the latency they saved. Stays 0 with the mode off.
  prometheus::Counter& busy_poll_seconds;

  // token health
  prometheus::Gauge& hsm_up;
  prometheus::Histogram& hsm_probe_duration_seconds;
  prometheus::Family<prometheus::Counter>& logins_total;  // {result}

  // connections
  prometheus::Gauge& connections;  // hsm_agent_connections_open
  prometheus::Counter& connections_total;
  prometheus::Family<prometheus::Counter>& connections_rejected_total;  // {reason}
  prometheus::Family<prometheus::Counter>& protocol_errors_total;       // {reason}
  /// Connections the agent closed on its own after admitting them (not protocol errors).
  prometheus::Family<prometheus::Counter>& connections_closed_total;  // {reason}
  prometheus::Counter& connections_closed_slow_reader;                // answers piled up unread
  prometheus::Counter& connections_closed_idle;                       // --idle-timeout passed
  prometheus::Counter& connections_closed_read_timeout;  // a message did not complete in time

  // memory (server/memory_budget.hpp)
  prometheus::Gauge& buffered_bytes;        // held for callers now (sampled every second)
  prometheus::Gauge& buffered_bytes_limit;  // --max-buffered-bytes
  /// Times a connection stopped reading because the budget had no room for it.
  prometheus::Counter& memory_budget_waits_total;

  // the audit log (log/audit_log.hpp)
  /// Lines lost: not queued because the writer's queue was full, or still unwritten at exit.
  prometheus::Counter& audit_dropped_lines_total;
  /// write(2) calls on the audit log that failed (retries included).
  prometheus::Counter& audit_write_errors_total;
  /// 1 while the audit log cannot be written (a write failed, or a line was dropped) and no
  /// write has succeeded since; key operations are refused then unless --audit-fail-open.
  prometheus::Gauge& audit_failing;

  prometheus::Family<prometheus::Gauge>& build_info;  // {version,module,token_label}

  /// The PKCS#11 layer's view of the metrics above (pkcs11/stats.hpp): what Module, Token and
  /// SessionPool record.
  pkcs11::Pkcs11Stats pkcs11;

  /// The counter for one (method, code) pair; nullopt is success (code="ok"). Cached: a lookup
  /// in a fixed table after the first use; safe from any thread.
  prometheus::Counter& request_counter(protocol::Method method,
                                       std::optional<protocol::ErrorCode> code);
  /// Records a request's latency in its method's histogram, if the method has one
  /// (kTimedMethods, or every method with --metrics-all-histograms). Safe from any thread.
  void observe_request(protocol::Method method, double seconds);

 private:
  static constexpr std::size_t kMethods = 11;
  static constexpr std::size_t kCodes = 16;  // every ErrorCode + "ok"
  static_assert(kCodes == static_cast<std::size_t>(protocol::ErrorCode::kInternal) + 2);
  std::array<std::array<std::atomic<prometheus::Counter*>, kCodes>, kMethods> request_counters_{};
  std::array<prometheus::Histogram*, kMethods> request_histograms_{};  // nullptr: not timed
};

}  // namespace hsm::agent
