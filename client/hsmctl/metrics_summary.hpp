// `hsmctl metrics`: fetches the agent's own /metrics (and /readyz) over plain HTTP and reduces
// the Prometheus text exposition to the few numbers an operator looks at first (docs/metrics.md
// explains each). No Prometheus server needed; the quantiles are computed from the histogram
// buckets since the agent started, the way histogram_quantile() interpolates them.
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace hsm::hsmctl {

/// The metrics endpoint cannot be reached (refused, unresolvable, timed out): exit code 4.
class MetricsUnreachable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct HttpAnswer {
  int status = 0;
  std::string body;
};

/// `url` is http://HOST[:PORT][/PATH] (no TLS: the endpoint is local to the pod or host).
/// Throws std::invalid_argument for another URL shape, MetricsUnreachable when no connection
/// is made or no complete answer arrives within `timeout`, std::runtime_error for an answer
/// over `max_bytes` or that is not HTTP.
[[nodiscard]] HttpAnswer http_get(const std::string& url, std::chrono::milliseconds timeout,
                                  std::size_t max_bytes);

/// The same URL with its path replaced by `path` (http://h:p/metrics -> http://h:p/readyz).
[[nodiscard]] std::string with_path(const std::string& url, const std::string& path);

struct MetricSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

/// The samples of a text exposition (version 0.0.4); comment lines skipped. Throws
/// std::runtime_error naming the line for a sample line it cannot read.
[[nodiscard]] std::vector<MetricSample> parse_exposition(const std::string& text);

struct MetricsSummary {
  std::optional<double> hsm_up;                    // hsm_agent_hsm_up
  bool ready = false;                              // /readyz answered 200
  std::string ready_text;                          // /readyz's one line
  std::map<std::string, double> requests_by_code;  // summed over methods
  double sign_count = 0;
  std::optional<double> sign_p50_seconds, sign_p99_seconds;
  std::optional<double> queue_wait_p99_seconds;
  std::optional<double> sessions_idle, sessions_busy;
  std::optional<double> requests_in_flight;
  std::map<std::string, double> pkcs11_errors_by_ckr;  // summed over functions, non-zero only
  std::optional<double> connections_open, connections_accepted;
  std::map<std::string, double> connections_rejected_by_reason;
  std::string version;  // from hsm_agent_build_info
  std::string token_label;
};

[[nodiscard]] MetricsSummary summarize(const std::vector<MetricSample>& samples);

/// The q-quantile (0..1) of the histogram `name`_bucket whose labels include `subset`, by
/// linear interpolation inside the bucket (as PromQL's histogram_quantile); nullopt without
/// observations.
[[nodiscard]] std::optional<double> histogram_quantile(
    double q, const std::vector<MetricSample>& samples, const std::string& name,
    const std::map<std::string, std::string>& subset = {});

}  // namespace hsm::hsmctl
