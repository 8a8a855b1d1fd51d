// The agent's HTTP endpoint: /metrics (prometheus-cpp's text serializer over the registry),
// /healthz (liveness) and /readyz (readiness) on one listener, so Kubernetes probes and
// Prometheus scrape the same port.
//
// GNU libmicrohttpd serves it on one thread of its own, never on the event loop. It is
// event-driven (epoll): a connection that sends nothing, or half a request, costs a file
// descriptor and a little memory, not a thread, so clients that stall cannot keep the probes
// waiting. What clients may hold is bounded by the constants below (docs/security.md, "The
// metrics port"). Every answer closes its connection.
#pragma once

#include <prometheus/registry.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>

#include "metrics/health_state.hpp"

namespace hsm::agent {

class HttpEndpoint {
 public:
  /// From accept to the end of the request headers, whatever arrives meanwhile (a byte at a
  /// time does not extend it); then the connection is closed unanswered.
  static constexpr std::chrono::milliseconds kHeaderTimeout{1000};
  /// An answer that makes no progress for this long (its client does not read) is abandoned.
  static constexpr unsigned kStallTimeoutSeconds = 2;
  /// Connections open from one peer address; a further one is closed at accept.
  static constexpr unsigned kMaxConnectionsPerPeer = 8;
  /// Connections open in all; further ones wait in the listen backlog until one ends.
  static constexpr unsigned kMaxConnections = 256;
  /// libmicrohttpd's memory pool per connection: the request line and headers must fit in it
  /// (with room for the answer's headers); a larger request is answered 414 or 431 and closed.
  static constexpr std::size_t kConnectionMemory = 16 * 1024;

  /// Binds `listen` ("HOST:PORT": HOST an IPv4 address, an IPv6 address in brackets or a name;
  /// port 0 picks a free one) with SO_REUSEADDR, so that a restarted agent binds the port while
  /// connections of the previous one linger in TIME_WAIT, and starts serving. Throws
  /// std::runtime_error naming the address when it cannot. `health` must outlive this object.
  /// `extra` (e.g. the process collector) is serialised after the registry.
  HttpEndpoint(const std::string& listen, std::shared_ptr<prometheus::Registry> registry,
               const HealthState& health, std::shared_ptr<prometheus::Collectable> extra = nullptr);
  /// Stops at once: the serving thread ends, open connections close, the port is released.
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  /// The bound port (useful with port 0).
  [[nodiscard]] int port() const;
  /// "http://HOST:PORT/metrics" with the bound port, for clients on this host or pod: a
  /// wildcard address (0.0.0.0, [::]) becomes the loopback address of its family.
  [[nodiscard]] std::string metrics_url() const;

 private:
  class Server;
  std::unique_ptr<Server> server_;
};

}  // namespace hsm::agent
