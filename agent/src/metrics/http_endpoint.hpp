// The agent's HTTP endpoint (civetweb, its own threads): /metrics (prometheus-cpp's text
// serializer over the registry), /healthz (liveness) and /readyz (readiness) on one listener,
// so Kubernetes probes and Prometheus scrape the same port.
#pragma once

#include <prometheus/registry.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "metrics/health_state.hpp"

class CivetServer;

namespace hsm::agent {

class HttpEndpoint {
 public:
  /// Binds `listen` ("HOST:PORT"; port 0 picks a free one). Throws std::runtime_error naming
  /// the address when it cannot bind. `health` must outlive this object. `extra` (e.g. the
  /// process collector) is serialised after the registry.
  HttpEndpoint(const std::string& listen, std::shared_ptr<prometheus::Registry> registry,
               const HealthState& health,
               std::shared_ptr<prometheus::Collectable> extra = nullptr);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  /// The bound port (useful with port 0).
  [[nodiscard]] int port() const;

 private:
  class Handlers;
  std::unique_ptr<Handlers> handlers_;
  std::unique_ptr<CivetServer> server_;
};

}  // namespace hsm::agent
