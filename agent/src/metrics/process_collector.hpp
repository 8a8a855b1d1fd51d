// Standard process_* metrics (CPU, RSS, virtual memory, open and max fds, start time) read from
// /proc/self at scrape time. prometheus-cpp 1.0 does not ship a process collector; these follow
// the names of the Prometheus client libraries' process collectors.
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
