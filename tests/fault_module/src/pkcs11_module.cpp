// libhsm_fault_pkcs11.so: a PKCS#11 module that forwards every call to a real module
// (HSM_FAULT_TARGET) and injects the faults its control file (HSM_FAULT_CONTROL) asks for.
// The behaviour and the environment are documented in tests/fault_module/README.md.
//
// Only C_GetFunctionList is exported (exports.map, -fvisibility=hidden); every other entry point
// is reached through the CK_FUNCTION_LIST it returns, generated from HSM_FAULT_PKCS11_FUNCTIONS.

#include <p11-kit/pkcs11.h>

#include <charconv>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>

#include "call_stats.hpp"
#include "fault_controller.hpp"
#include "function_table.hpp"
#include "session_limit.hpp"
#include "stderr_report.hpp"
#include "target_module.hpp"

namespace hsm::fault {
namespace {

constexpr std::chrono::microseconds kDefaultPollInterval{1000};
constexpr std::chrono::microseconds kMaxPollInterval{1'000'000};

/// Everything one instance of the module owns. Created on first use and deliberately never
/// destroyed: calls (a hung one, the stats writer) may still run while the process exits, and
/// the library is linked with -z nodelete so dlclose() never unmaps it under them.
struct ModuleState {
  ModuleState(const CK_FUNCTION_LIST* self, const std::string& target_path,
              std::string control_path, std::chrono::microseconds poll_interval,
              std::string stats_path, std::optional<std::size_t> max_sessions)
      : target_module(target_path, self),
        faults(std::move(control_path), poll_interval),
        stats(std::move(stats_path)),
        session_limit(max_sessions) {}

  TargetModule target_module;
  FaultController faults;
  CallStats stats;
  SessionLimit session_limit;
};

std::string environment(const char* name, std::string_view fallback = {}) {
  // Read once, on the first call into the module, before the host has reason to change it.
  const char* value = std::getenv(name);  // NOLINT(concurrency-mt-unsafe)
  return value != nullptr && *value != '\0' ? std::string(value) : std::string(fallback);
}

std::chrono::microseconds poll_interval_from_environment() {
  const std::string text = environment("HSM_FAULT_POLL_US");
  if (text.empty()) {
    return kDefaultPollInterval;
  }
  std::int64_t value = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value < 0 ||
      value > kMaxPollInterval.count()) {
    report("HSM_FAULT_POLL_US=" + text + " is not a number of microseconds in [0, " +
           std::to_string(kMaxPollInterval.count()) + "]; using " +
           std::to_string(kDefaultPollInterval.count()));
    return kDefaultPollInterval;
  }
  return std::chrono::microseconds(value);
}

std::optional<std::size_t> max_sessions_from_environment() {
  const std::string text = environment("HSM_FAULT_MAX_SESSIONS");
  if (text.empty()) {
    return std::nullopt;
  }
  std::size_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value == 0) {
    report("HSM_FAULT_MAX_SESSIONS=" + text + " is not a positive number; no session limit");
    return std::nullopt;
  }
  return value;
}

extern CK_FUNCTION_LIST function_list;

/// The module's state; the environment is read once, on the first call into the module.
ModuleState& module_state() {
  static ModuleState* const state =
      new ModuleState(&function_list, environment("HSM_FAULT_TARGET", kDefaultTarget),
                      environment("HSM_FAULT_CONTROL"), poll_interval_from_environment(),
                      environment("HSM_FAULT_STATS"), max_sessions_from_environment());
  return *state;
}

/// What a call does after the fault rules have had their say.
struct CallPlan {
  bool forward = true;          ///< call the target
  std::optional<CK_RV> result;  ///< returned instead of the target's result
};

/// Applies the fault rules to one call: sleeps for a delay, blocks for a hang, and says whether
/// to forward and what to return. Without rules this is a poll() and one atomic load.
CallPlan plan_call(ModuleState& module, FunctionId function,
                   std::optional<CK_SESSION_HANDLE> session) noexcept {
  module.faults.poll();
  if (!module.faults.armed()) {
    return {};
  }
  const std::optional<Fault> fault = module.faults.take_fault(function, session);
  if (!fault) {
    return {};
  }
  module.stats.count_injected(function);
  if (fault->delay.count() > 0) {
    std::this_thread::sleep_for(fault->delay);
  }
  if (fault->hang != nullptr &&
      module.faults.wait_while_hung(*fault) == FaultController::HangEnd::kFinalized) {
    // C_Finalize ran while we were hung: the target may be gone, so do not touch it.
    return {false, CKR_CRYPTOKI_NOT_INITIALIZED};
  }
  if (!fault->rv) {
    return {};
  }
  // An error from a function that ends an operation ends it on a real token too; forwarding
  // first keeps the real token's state in step (the next C_SignInit must not see
  // CKR_OPERATION_ACTIVE). Other functions fail without reaching the target at all.
  return {kind_of(function) == CallKind::kEndsOperation, fault->rv};
}

template <CallKind Kind, typename First, typename... Rest>
std::optional<CK_SESSION_HANDLE> session_argument([[maybe_unused]] First first,
                                                  Rest... /*rest*/) noexcept {
  if constexpr (Kind == CallKind::kGlobal) {
    return std::nullopt;
  } else {
    return first;
  }
}

CK_RV hand_out_function_list(CK_FUNCTION_LIST_PTR_PTR list) noexcept {
  if (list == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  *list = &function_list;
  return CKR_OK;
}

/// Keeps the emulated session limit (session_limit.hpp) in step with a forwarded call.
template <FunctionId Id, typename... Args>
void keep_session_limit(SessionLimit& limit, CK_RV rv, Args... args) noexcept {
  if constexpr (Id == FunctionId::C_OpenSession) {
    limit.opened(rv);
  } else if constexpr (Id == FunctionId::C_CloseSession) {
    if (rv == CKR_OK) limit.closed();
  } else if constexpr (Id == FunctionId::C_CloseAllSessions || Id == FunctionId::C_Finalize) {
    if (rv == CKR_OK) limit.reset();
  } else if constexpr (Id == FunctionId::C_GetTokenInfo) {
    if (rv == CKR_OK) {
      const auto info = std::get<1>(std::forward_as_tuple(args...));
      if (info != nullptr) limit.state(*info);
    }
  }
}

/// The entry point for one PKCS#11 function, its signature taken from CK_FUNCTION_LIST's member
/// so it can never disagree with the header.
template <FunctionId Id, auto Member, typename Signature>
struct Forwarder;

template <FunctionId Id, auto Member, typename... Args>
struct Forwarder<Id, Member, CK_RV (*)(Args...)> {
  static CK_RV call(Args... args) noexcept {
    ModuleState& module = module_state();
    module.stats.count_call(Id);
    if constexpr (Id == FunctionId::C_GetFunctionList) {
      return hand_out_function_list(args...);
    } else {
      // C_Initialize is where the target gets loaded; before that nothing can be forwarded.
      CK_FUNCTION_LIST* const target =
          Id == FunctionId::C_Initialize ? module.target_module.load() : module.target_module.get();
      if (target == nullptr) {
        return Id == FunctionId::C_Initialize ? CKR_GENERAL_ERROR : CKR_CRYPTOKI_NOT_INITIALIZED;
      }
      const CallPlan plan = plan_call(module, Id, session_argument<kind_of(Id)>(args...));
      if constexpr (Id == FunctionId::C_Finalize) {
        if (plan.forward) {
          module.faults.release_hung_calls();
        }
      }
      CK_RV rv = CKR_OK;
      if (plan.forward) {
        if constexpr (Id == FunctionId::C_OpenSession) {
          if (const auto refused = module.session_limit.reserve()) {
            return *refused;
          }
        }
        rv = (target->*Member)(args...);
        keep_session_limit<Id>(module.session_limit, rv, args...);
      }
      if constexpr (Id == FunctionId::C_Finalize) {
        module.stats.flush();
      }
      return plan.result.value_or(rv);
    }
  }
};

#define HSM_FAULT_LIST_ENTRY(name, kind)                        \
  .name = &Forwarder<FunctionId::name, &CK_FUNCTION_LIST::name, \
                     decltype(CK_FUNCTION_LIST::name)>::call,

// Handed out by C_GetFunctionList; callers get a non-const pointer (PKCS#11 says so) but must
// not write through it.
constinit CK_FUNCTION_LIST function_list = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
    HSM_FAULT_PKCS11_FUNCTIONS(HSM_FAULT_LIST_ENTRY)};

#undef HSM_FAULT_LIST_ENTRY

}  // namespace
}  // namespace hsm::fault

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR list) {
  return hsm::fault::function_list.C_GetFunctionList(list);
}
