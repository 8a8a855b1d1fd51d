// The real PKCS#11 module every call is forwarded to (HSM_FAULT_TARGET, SoftHSMv2 by default).
#pragma once

#include <p11-kit/pkcs11.h>

#include <atomic>
#include <mutex>
#include <string>

namespace hsm::fault {

inline constexpr const char* kDefaultTarget = "/usr/lib/softhsm/libsofthsm2.so";

/// Thread-safe. Once loaded, the target stays loaded for the life of the process (never
/// dlclose'd): a call racing process exit, or a hung call released late, must never jump into
/// unmapped code.
class TargetModule {
 public:
  /// `self` is our own function list, to refuse a target that is this very module (which would
  /// forward every call to itself forever).
  TargetModule(std::string path, const CK_FUNCTION_LIST* self);
  TargetModule(const TargetModule&) = delete;
  TargetModule& operator=(const TargetModule&) = delete;
  TargetModule(TargetModule&&) = delete;
  TargetModule& operator=(TargetModule&&) = delete;
  ~TargetModule() = default;

  /// The target's function list, loading it on first use. On failure: nullptr, one line on
  /// stderr naming HSM_FAULT_TARGET and the reason; the next call tries again.
  [[nodiscard]] CK_FUNCTION_LIST* load() noexcept;

  /// The target's function list if it has been loaded, else nullptr. Lock-free.
  [[nodiscard]] CK_FUNCTION_LIST* get() const noexcept {
    return functions_.load(std::memory_order_acquire);
  }

 private:
  const std::string path_;
  const CK_FUNCTION_LIST* const self_;
  std::mutex load_mutex_;  // one dlopen at a time (dlerror() is per thread but keep it simple)
  std::atomic<CK_FUNCTION_LIST*> functions_{nullptr};
};

}  // namespace hsm::fault
