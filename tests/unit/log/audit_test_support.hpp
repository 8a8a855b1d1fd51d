// What the audit log tests share: a private temporary directory, and the metrics and health
// state an AuditLog reports to.
#pragma once

#include <prometheus/registry.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "fixtures/temp_dir.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"

namespace hsm::agent::test {

using hsm::test::TempDir;  // tests/fixtures/temp_dir.hpp

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
