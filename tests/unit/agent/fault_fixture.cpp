#include "fault_fixture.hpp"

#include <cstdlib>
#include <system_error>

#include "fixtures/fault_module.hpp"
#include "fixtures/softhsm_token.hpp"

namespace hsm::agent::test {
namespace {

// One control file for the whole process (the module reads HSM_FAULT_CONTROL once).
const std::filesystem::path& control_file() {
  static const std::filesystem::path path = [] {
    const auto dir = hsm::test::make_temp_dir("hsm-agent-unit-faults");
    const auto file = dir / "faults.conf";
    ::setenv("HSM_FAULT_TARGET", hsm::test::kSoftHsmModule, 1);
    ::setenv("HSM_FAULT_CONTROL", file.c_str(), 1);
    ::setenv("HSM_FAULT_POLL_US", "0", 1);  // a rule written before a call applies to it
    return file;
  }();
  return path;
}

}  // namespace

std::string fault_module_path() {
  (void)control_file();  // the environment must be in place before the module is loaded
  return HSM_FAULT_MODULE;
}

FaultRules::FaultRules() {
  clear();
}

FaultRules::~FaultRules() {
  clear();
}

void FaultRules::set(const std::string& rules) const {
  hsm::test::write_fault_rules(control_file(), rules);
}

void FaultRules::clear() const {
  std::error_code ec;
  std::filesystem::remove(control_file(), ec);
}

std::uint64_t pkcs11_calls(AgentMetrics& metrics, const std::string& function) {
  return static_cast<std::uint64_t>(
      metrics.pkcs11_calls_total.Add({{"function", function}}).Value());
}

}  // namespace hsm::agent::test
