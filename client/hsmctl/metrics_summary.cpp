#include "metrics_summary.hpp"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <utility>

namespace hsm::hsmctl {
namespace {

using Clock = std::chrono::steady_clock;

struct Url {
  std::string host;
  std::string port = "80";
  std::string path = "/";
};

Url parse_url(const std::string& url) {
  constexpr std::string_view kScheme = "http://";
  if (url.rfind(kScheme, 0) != 0) {
    throw std::invalid_argument("metrics URL must start with http:// (got '" + url + "')");
  }
  const std::string rest = url.substr(kScheme.size());
  const auto slash = rest.find('/');
  const std::string authority = rest.substr(0, slash);
  Url parsed;
  if (slash != std::string::npos) parsed.path = rest.substr(slash);
  if (!authority.empty() && authority.front() == '[') {  // [v6]:port
    const auto close = authority.find(']');
    if (close == std::string::npos) throw std::invalid_argument("bad metrics URL '" + url + "'");
    parsed.host = authority.substr(1, close - 1);
    if (close + 1 < authority.size() && authority[close + 1] == ':') {
      parsed.port = authority.substr(close + 2);
    }
  } else {
    const auto colon = authority.rfind(':');
    parsed.host = authority.substr(0, colon);
    if (colon != std::string::npos) parsed.port = authority.substr(colon + 1);
  }
  if (parsed.host.empty() || parsed.port.empty()) {
    throw std::invalid_argument("bad metrics URL '" + url + "'");
  }
  return parsed;
}

class Socket {
 public:
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  [[nodiscard]] int fd() const noexcept { return fd_; }

 private:
  int fd_;
};

using AddrInfo = std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)>;

int remaining_ms(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::max<std::chrono::milliseconds::rep>(0, left.count()));
}

/// Waits for `events` on `fd` until `deadline`; false on timeout.
bool wait_for(int fd, short events, Clock::time_point deadline) {
  pollfd p{fd, events, 0};
  for (;;) {
    const int rc = ::poll(&p, 1, remaining_ms(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

std::string with_path(const std::string& url, const std::string& path) {
  constexpr std::string_view kScheme = "http://";
  const auto slash = url.find('/', url.rfind(kScheme, 0) == 0 ? kScheme.size() : 0);
  return (slash == std::string::npos ? url : url.substr(0, slash)) + path;
}

HttpAnswer http_get(const std::string& url, std::chrono::milliseconds timeout,
                    std::size_t max_bytes) {
  const Url target = parse_url(url);
  const auto deadline = Clock::now() + timeout;
  const std::string where = "the agent's metrics endpoint " + url;

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(target.host.c_str(), target.port.c_str(), &hints, &found);
      rc != 0) {
    throw MetricsUnreachable("cannot reach " + where + ": " + ::gai_strerror(rc));
  }
  const AddrInfo addresses(found, &::freeaddrinfo);

  std::string last_error = "no address";
  for (const addrinfo* address = addresses.get(); address != nullptr; address = address->ai_next) {
    Socket sock(::socket(address->ai_family, address->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                         address->ai_protocol));
    if (sock.fd() < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    if (::connect(sock.fd(), address->ai_addr, address->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last_error = std::strerror(errno);
        continue;
      }
      if (!wait_for(sock.fd(), POLLOUT, deadline)) {
        last_error = "timed out connecting";
        continue;
      }
      int error = 0;
      socklen_t length = sizeof(error);
      ::getsockopt(sock.fd(), SOL_SOCKET, SO_ERROR, &error, &length);
      if (error != 0) {
        last_error = std::strerror(error);
        continue;
      }
    }

    const std::string request = "GET " + target.path + " HTTP/1.0\r\nHost: " + target.host +
                                "\r\nAccept: text/plain\r\nConnection: close\r\n\r\n";
    std::size_t sent = 0;
    while (sent < request.size()) {
      if (!wait_for(sock.fd(), POLLOUT, deadline)) {
        throw MetricsUnreachable("timed out sending to " + where);
      }
      const ssize_t n =
          ::send(sock.fd(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN && errno != EINTR) {
        throw MetricsUnreachable("cannot send to " + where + ": " + std::strerror(errno));
      }
      if (n > 0) sent += static_cast<std::size_t>(n);
    }

    std::string response;
    char buffer[16384];
    for (;;) {
      if (!wait_for(sock.fd(), POLLIN, deadline)) {
        throw MetricsUnreachable("no complete answer from " + where + " within " +
                                 std::to_string(timeout.count()) + " ms");
      }
      const ssize_t n = ::recv(sock.fd(), buffer, sizeof(buffer), 0);
      if (n == 0) break;
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        throw MetricsUnreachable("cannot read from " + where + ": " + std::strerror(errno));
      }
      if (response.size() + static_cast<std::size_t>(n) > max_bytes) {
        throw std::runtime_error(where + " answered more than " + std::to_string(max_bytes) +
                                 " bytes");
      }
      response.append(buffer, static_cast<std::size_t>(n));
    }
    const auto header_end = response.find("\r\n\r\n");
    if (response.rfind("HTTP/1.", 0) != 0 || header_end == std::string::npos) {
      throw std::runtime_error(where + " did not answer HTTP");
    }
    HttpAnswer answer;
    try {
      answer.status = std::stoi(response.substr(9, 3));
    } catch (const std::exception&) {
      throw std::runtime_error(where + " answered a bad HTTP status line");
    }
    answer.body = response.substr(header_end + 4);
    return answer;
  }
  throw MetricsUnreachable("cannot reach " + where + ": " + last_error +
                           " (is the agent running with --metrics-listen there?)");
}

std::vector<MetricSample> parse_exposition(const std::string& text) {
  std::vector<MetricSample> samples;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto bad = [&line] { return std::runtime_error("cannot read metrics line: " + line); };
    MetricSample sample;
    std::size_t i = line.find_first_of("{ ");
    if (i == std::string::npos) throw bad();
    sample.name = line.substr(0, i);
    if (line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const auto eq = line.find("=\"", i);
        if (eq == std::string::npos) throw bad();
        const std::string key = line.substr(i, eq - i);
        std::string value;
        std::size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) {
            ++j;
            value.push_back(line[j] == 'n' ? '\n' : line[j]);
          } else {
            value.push_back(line[j]);
          }
        }
        if (j >= line.size()) throw bad();
        sample.labels[key] = std::move(value);
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      if (i >= line.size()) throw bad();
      ++i;
    }
    const auto value_start = line.find_first_not_of(' ', i);
    if (value_start == std::string::npos) throw bad();
    const auto value_end = line.find(' ', value_start);
    const std::string value = line.substr(value_start, value_end - value_start);
    if (value == "+Inf") {
      sample.value = std::numeric_limits<double>::infinity();
    } else if (value == "-Inf") {
      sample.value = -std::numeric_limits<double>::infinity();
    } else if (value == "NaN") {
      sample.value = std::numeric_limits<double>::quiet_NaN();
    } else {
      try {
        sample.value = std::stod(value);
      } catch (const std::exception&) {
        throw bad();
      }
    }
    samples.push_back(std::move(sample));
  }
  return samples;
}

namespace {

bool has_labels(const MetricSample& sample, const std::map<std::string, std::string>& subset) {
  return std::all_of(subset.begin(), subset.end(), [&sample](const auto& label) {
    const auto it = sample.labels.find(label.first);
    return it != sample.labels.end() && it->second == label.second;
  });
}

std::optional<double> single(const std::vector<MetricSample>& samples, const std::string& name,
                             const std::map<std::string, std::string>& subset = {}) {
  for (const auto& sample : samples) {
    if (sample.name == name && has_labels(sample, subset)) return sample.value;
  }
  return std::nullopt;
}

double le_of(const MetricSample& bucket) {
  const auto it = bucket.labels.find("le");
  if (it == bucket.labels.end()) return std::numeric_limits<double>::quiet_NaN();
  if (it->second == "+Inf") return std::numeric_limits<double>::infinity();
  try {
    return std::stod(it->second);
  } catch (const std::exception&) {
    return std::numeric_limits<double>::quiet_NaN();
  }
}

}  // namespace

std::optional<double> histogram_quantile(double q, const std::vector<MetricSample>& samples,
                                         const std::string& name,
                                         const std::map<std::string, std::string>& subset) {
  std::vector<std::pair<double, double>> buckets;  // (le, cumulative count)
  for (const auto& sample : samples) {
    if (sample.name != name + "_bucket" || !has_labels(sample, subset)) continue;
    const double le = le_of(sample);
    if (std::isnan(le)) continue;
    buckets.emplace_back(le, sample.value);
  }
  std::sort(buckets.begin(), buckets.end());
  if (buckets.empty() || !std::isinf(buckets.back().first)) return std::nullopt;
  const double total = buckets.back().second;
  if (!(total > 0)) return std::nullopt;
  const double rank = q * total;
  double lower = 0, below = 0;
  for (const auto& [le, count] : buckets) {
    if (count >= rank) {
      // In the +Inf bucket there is no upper bound: the highest finite bound, as PromQL does.
      if (std::isinf(le)) return lower;
      if (count == below) return le;
      return lower + (le - lower) * (rank - below) / (count - below);
    }
    lower = le;
    below = count;
  }
  return lower;
}

MetricsSummary summarize(const std::vector<MetricSample>& samples) {
  MetricsSummary summary;
  summary.hsm_up = single(samples, "hsm_agent_hsm_up");
  summary.sessions_idle = single(samples, "hsm_agent_sessions", {{"state", "idle"}});
  summary.sessions_busy = single(samples, "hsm_agent_sessions", {{"state", "busy"}});
  summary.requests_in_flight = single(samples, "hsm_agent_requests_in_flight");
  summary.connections_open = single(samples, "hsm_agent_connections_open");
  summary.connections_accepted = single(samples, "hsm_agent_connections_total");
  summary.sign_count =
      single(samples, "hsm_agent_request_duration_seconds_count", {{"method", "sign"}}).value_or(0);
  summary.sign_p50_seconds =
      histogram_quantile(0.5, samples, "hsm_agent_request_duration_seconds", {{"method", "sign"}});
  summary.sign_p99_seconds =
      histogram_quantile(0.99, samples, "hsm_agent_request_duration_seconds", {{"method", "sign"}});
  summary.queue_wait_p99_seconds =
      histogram_quantile(0.99, samples, "hsm_agent_queue_wait_seconds");
  for (const auto& sample : samples) {
    if (sample.name == "hsm_agent_requests_total" && sample.value > 0) {
      summary.requests_by_code[sample.labels.count("code") ? sample.labels.at("code") : "?"] +=
          sample.value;
    } else if (sample.name == "hsm_agent_pkcs11_errors_total" && sample.value > 0) {
      summary.pkcs11_errors_by_ckr[sample.labels.count("ckr") ? sample.labels.at("ckr") : "?"] +=
          sample.value;
    } else if (sample.name == "hsm_agent_connections_rejected_total") {
      summary
          .connections_rejected_by_reason[sample.labels.count("reason") ? sample.labels.at("reason")
                                                                        : "?"] += sample.value;
    } else if (sample.name == "hsm_agent_build_info") {
      if (sample.labels.count("version")) summary.version = sample.labels.at("version");
      if (sample.labels.count("token_label")) {
        summary.token_label = sample.labels.at("token_label");
      }
    }
  }
  return summary;
}

}  // namespace hsm::hsmctl
