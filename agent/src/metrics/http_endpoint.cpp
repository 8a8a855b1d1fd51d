#include "metrics/http_endpoint.hpp"

#include <CivetServer.h>
#include <prometheus/text_serializer.h>

#include <chrono>
#include <iterator>
#include <string_view>
#include <vector>

namespace hsm::agent {
namespace {

// The loop ticks every second; three missed ticks mean it is stuck.
constexpr std::chrono::milliseconds kMaxLoopSilence{3000};

void reply(mg_connection* conn, int status, std::string_view content_type,
           std::string_view body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %.*s\r\nContent-Length: %zu\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            status, status == 200 ? "OK" : "Service Unavailable",
            static_cast<int>(content_type.size()), content_type.data(), body.size());
  mg_write(conn, body.data(), body.size());
}

}  // namespace

class HttpEndpoint::Handlers {
 public:
  Handlers(std::shared_ptr<prometheus::Registry> registry, const HealthState& health,
           std::shared_ptr<prometheus::Collectable> extra)
      : metrics_(std::move(registry), std::move(extra)), health_(health), ready_(health) {}

  class Metrics final : public CivetHandler {
   public:
    Metrics(std::shared_ptr<prometheus::Registry> registry,
            std::shared_ptr<prometheus::Collectable> extra)
        : registry_(std::move(registry)), extra_(std::move(extra)) {}
    bool handleGet(CivetServer*, mg_connection* conn) override {
      auto families = registry_->Collect();
      if (extra_) {
        auto more = extra_->Collect();
        families.insert(families.end(), std::make_move_iterator(more.begin()),
                        std::make_move_iterator(more.end()));
      }
      const std::string body = prometheus::TextSerializer().Serialize(families);
      reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", body);
      return true;
    }

   private:
    std::shared_ptr<prometheus::Registry> registry_;
    std::shared_ptr<prometheus::Collectable> extra_;
  };

  class Liveness final : public CivetHandler {
   public:
    explicit Liveness(const HealthState& health) : health_(health) {}
    bool handleGet(CivetServer*, mg_connection* conn) override {
      if (health_.loop_alive(kMaxLoopSilence)) {
        reply(conn, 200, "text/plain", "ok\n");
      } else {
        reply(conn, 503, "text/plain", "event loop not responding\n");
      }
      return true;
    }

   private:
    const HealthState& health_;
  };

  class Readiness final : public CivetHandler {
   public:
    explicit Readiness(const HealthState& health) : health_(health) {}
    bool handleGet(CivetServer*, mg_connection* conn) override {
      if (const auto reason = health_.not_ready_reason()) {
        reply(conn, 503, "text/plain", *reason + "\n");
      } else if (const auto note = health_.readiness_note()) {
        reply(conn, 200, "text/plain", "ready; " + *note + "\n");
      } else {
        reply(conn, 200, "text/plain", "ready\n");
      }
      return true;
    }

   private:
    const HealthState& health_;
  };

  Metrics metrics_;
  Liveness health_;
  Readiness ready_;
};

HttpEndpoint::HttpEndpoint(const std::string& listen,
                           std::shared_ptr<prometheus::Registry> registry,
                           const HealthState& health,
                           std::shared_ptr<prometheus::Collectable> extra)
    : handlers_(std::make_unique<Handlers>(std::move(registry), health, std::move(extra))) {
  const std::vector<std::string> options = {"listening_ports", listen, "num_threads", "2",
                                            "request_timeout_ms", "5000"};
  try {
    server_ = std::make_unique<CivetServer>(options);
  } catch (const CivetException& e) {
    throw std::runtime_error("cannot listen for metrics on " + listen + ": " + e.what());
  }
  if (server_->getContext() == nullptr) {
    throw std::runtime_error("cannot listen for metrics on " + listen);
  }
  server_->addHandler("/metrics", handlers_->metrics_);
  server_->addHandler("/healthz", handlers_->health_);
  server_->addHandler("/readyz", handlers_->ready_);
}

HttpEndpoint::~HttpEndpoint() {
  if (server_) server_->close();
}

int HttpEndpoint::port() const {
  const auto ports = server_->getListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

}  // namespace hsm::agent
