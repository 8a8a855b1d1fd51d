// The fault-injecting PKCS#11 module (tests/fault_module) for the agent's unit tests: loaded in
// front of SoftHSMv2 in this test process. The module reads its environment once, on its first
// use in the process, so one control file serves every test of the process; each test sets its
// rules through a FaultRules, which clears them when the test ends.
#pragma once

#include <filesystem>
#include <string>

#include "metrics/agent_metrics.hpp"

namespace hsm::agent::test {

/// The module's path (pass it as ServiceOptions::module).
[[nodiscard]] std::string fault_module_path();

/// The rules of the fault module for one test; cleared on destruction.
class FaultRules {
 public:
  /// Points the module at this process's control file (before its first use) and clears it.
  FaultRules();
  ~FaultRules();
  FaultRules(const FaultRules&) = delete;
  FaultRules& operator=(const FaultRules&) = delete;

  /// Replaces the rules atomically (temporary file + rename). In force for the next call
  /// into the module (HSM_FAULT_POLL_US=0).
  void set(const std::string& rules) const;
  void clear() const;
};

/// PKCS#11 calls of `function` made so far through the agent's call wrapper, from the
/// pkcs11_calls_total counter of `metrics`.
[[nodiscard]] std::uint64_t pkcs11_calls(AgentMetrics& metrics, const std::string& function);

}  // namespace hsm::agent::test
