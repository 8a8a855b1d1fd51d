#include "target_module.hpp"

#include <dlfcn.h>

#include <utility>

#include "stderr_report.hpp"

namespace hsm::fault {

TargetModule::TargetModule(std::string path, const CK_FUNCTION_LIST* self)
    : path_(std::move(path)), self_(self) {}

CK_FUNCTION_LIST* TargetModule::load() noexcept {
  if (CK_FUNCTION_LIST* loaded = get(); loaded != nullptr) {
    return loaded;
  }
  std::lock_guard lock(load_mutex_);
  if (CK_FUNCTION_LIST* loaded = get(); loaded != nullptr) {
    return loaded;
  }

  const auto fail = [this](const std::string& why, void* handle) -> CK_FUNCTION_LIST* {
    report("cannot use HSM_FAULT_TARGET=" + path_ + ": " + why);
    if (handle != nullptr) {
      ::dlclose(handle);
    }
    return nullptr;
  };
  try {
    void* handle = ::dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* error = ::dlerror();  // NOLINT(concurrency-mt-unsafe): under load_mutex_
      return fail(error != nullptr ? error : "dlopen failed", nullptr);
    }
    // POSIX: dlsym's void* converts to a function pointer (the one sanctioned use of this cast).
    auto* get_function_list =
        reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
    if (get_function_list == nullptr) {
      return fail("no C_GetFunctionList symbol", handle);
    }
    CK_FUNCTION_LIST* functions = nullptr;
    const CK_RV rv = get_function_list(&functions);
    if (rv != CKR_OK || functions == nullptr) {
      return fail("C_GetFunctionList failed with " + std::to_string(rv), handle);
    }
    if (functions == self_) {
      return fail("it is this fault module itself", handle);
    }
    functions_.store(functions, std::memory_order_release);
    return functions;  // `handle` is deliberately never closed (see the class comment)
  } catch (...) {
    report("cannot use HSM_FAULT_TARGET: out of memory");
    return nullptr;
  }
}

}  // namespace hsm::fault
