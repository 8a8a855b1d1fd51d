// Standard process_* metrics (CPU, RSS, virtual memory, open and max fds, start time) read from
// /proc/self at scrape time. prometheus-cpp 1.0 does not ship a process collector; these follow
// the names of the Prometheus client libraries' process collectors. Also the one agent metric
// kept outside the registry: hsm_agent_log_dropped_lines_total, read from the logger's queue
// (log/logging.hpp), which counts its drops itself.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <vector>

namespace hsm::agent {

class ProcessCollector final : public prometheus::Collectable {
 public:
  /// Thread-safe: reads /proc on each call; holds no state.
  [[nodiscard]] std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace hsm::agent
