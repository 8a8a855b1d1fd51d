// Per-function call counters of one module instance, published to the file named by
// HSM_FAULT_STATS so a test in another process (or the same one) can read them.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

#include "function_table.hpp"

namespace hsm::fault {

/// Thread-safe. The stats file is rewritten atomically (temporary file + rename) by a background
/// thread at most every kWriteInterval when something changed, and synchronously by flush().
/// File format, one counter per line, only non-zero ones, in CK_FUNCTION_LIST order:
///   C_Login 3            calls received (faulted ones included)
///   C_Login.injected 3   calls a rule applied to (rv, delay or hang)
///
/// Lifetime: the background thread is detached and uses this object until the process exits, so
/// an enabled CallStats must never be destroyed (the module keeps its state for the life of the
/// process and is linked with -z nodelete).
class CallStats {
 public:
  static constexpr auto kWriteInterval = std::chrono::milliseconds(25);

  /// `path` empty: counting is off and every method returns at once.
  explicit CallStats(std::string path);
  CallStats(const CallStats&) = delete;
  CallStats& operator=(const CallStats&) = delete;
  CallStats(CallStats&&) = delete;
  CallStats& operator=(CallStats&&) = delete;
  ~CallStats() = default;

  void count_call(FunctionId function) noexcept {
    if (path_.empty()) {
      return;
    }
    calls_[index_of(function)].fetch_add(1, std::memory_order_relaxed);
    mark_dirty();
  }
  void count_injected(FunctionId function) noexcept {
    if (path_.empty()) {
      return;
    }
    injected_[index_of(function)].fetch_add(1, std::memory_order_relaxed);
    mark_dirty();
  }

  /// Writes the file now (C_Finalize calls this, so counts are exact once it returns).
  void flush() noexcept;

 private:
  void mark_dirty() noexcept {
    // Read first: the common case (already dirty) then costs no write to a shared cache line.
    if (!dirty_.load(std::memory_order_relaxed)) {
      dirty_.store(true, std::memory_order_relaxed);
    }
  }
  void write_loop() noexcept;
  void write_file() noexcept;  // with write_mutex_ held

  const std::string path_;
  std::array<std::atomic<std::uint64_t>, kFunctionCount> calls_{};
  std::array<std::atomic<std::uint64_t>, kFunctionCount> injected_{};
  std::atomic<bool> dirty_{false};
  std::mutex write_mutex_;     // one writer of the file at a time; guards write_failed_
  bool write_failed_ = false;  // report a failing path once, not every 25 ms
};

}  // namespace hsm::fault
