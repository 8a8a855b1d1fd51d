// What the audit log tests share: a private temporary directory, and the metrics and health
// state an AuditLog reports to.
#pragma once

#include <prometheus/registry.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"

namespace hsm::agent::test {

/// A private temporary directory, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "hsm-audit-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

/// What an AuditLog reports to: metrics in a registry of their own, and a health state.
struct Observers {
  Observers() { health.set_ready(); }  // as a running agent's token is; "starting" otherwise

  prometheus::Registry registry;
  AgentMetrics metrics{registry};
  HealthState health;

  [[nodiscard]] double dropped() const { return metrics.audit_dropped_lines_total.Value(); }
  [[nodiscard]] double write_errors() const { return metrics.audit_write_errors_total.Value(); }
  [[nodiscard]] double failing() const { return metrics.audit_failing.Value(); }
};

}  // namespace hsm::agent::test
