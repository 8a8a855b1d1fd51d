// Pkcs11Stats: the metrics the PKCS#11 layer records, and nothing else (Envoy declares one stats
// struct per component). Module, Token and SessionPool take a Pkcs11Stats&, never the agent's
// whole metric set; AgentMetrics (metrics/agent_metrics.hpp) owns the instance, registered with
// the agent's registry, and tests read that registry. docs/metrics.md names each series.
//
// Thread-safety: prometheus-cpp metrics are thread-safe; Family::Add is locked but not free, so
// Module caches its per-function histograms once.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

namespace hsm::agent::pkcs11 {

struct Pkcs11Stats {
  /// Bucket boundaries for call_duration_seconds (the agent's latency buckets).
  const prometheus::Histogram::BucketBoundaries& latency_buckets;
  prometheus::Family<prometheus::Counter>& calls_total;  // {function}: every call
  /// {function}: the signing path's functions (kTimedFunctions in module.hpp), or every one when
  /// all_call_histograms.
  prometheus::Family<prometheus::Histogram>& call_duration_seconds;
  bool all_call_histograms = false;
  prometheus::Family<prometheus::Counter>& errors_total;  // {function,ckr}
  prometheus::Family<prometheus::Counter>& logins_total;  // {result}
  /// The session pool (pkcs11/session_pool.hpp): sessions open and idle, leased, the most the
  /// pool may open now, and how long acquire() waited.
  prometheus::Gauge& sessions_idle;
  prometheus::Gauge& sessions_busy;
  prometheus::Gauge& sessions_limit;
  prometheus::Histogram& session_wait_seconds;
};

}  // namespace hsm::agent::pkcs11
