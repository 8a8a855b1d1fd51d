// HeapTrimmer: hands the heap's free pages back to the system at a fixed interval.
//
// Calls are allocated on whichever thread holds the loop and freed on the workers, so glibc's
// per-thread arenas end up holding freed memory in scattered pages that they keep: under steady
// signing load the agent's RSS crept ~0.3 MiB a minute while the heap in use stayed flat
// (docs/performance.md, "Memory"). malloc_trim(0) returns those pages. It takes 1-3 ms under
// load, so it runs on a thread of its own, never on the loop.
//
// Thread-safety: construct and destroy on one thread; the trim runs on the trimmer's thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <stop_token>
#include <thread>

namespace hsm::agent {

class HeapTrimmer {
 public:
  /// Returns the free pages of every malloc arena to the system; true when any were returned.
  static bool trim_heap();

  /// Starts the thread: `trim` runs every `interval`, the first time one interval from now.
  explicit HeapTrimmer(std::chrono::milliseconds interval,
                       std::function<bool()> trim = &HeapTrimmer::trim_heap);
  // Destruction stops and joins the thread at once (it does not wait for the interval).
  HeapTrimmer(const HeapTrimmer&) = delete;
  HeapTrimmer& operator=(const HeapTrimmer&) = delete;

  /// Trims now rather than at the end of the interval (then the interval starts again): after a
  /// burst of large requests was freed, so that RSS comes back down soon. Thread-safe.
  void trim_soon();

 private:
  void run(const std::stop_token& stop);

  const std::chrono::milliseconds interval_;
  const std::function<bool()> trim_;
  std::mutex mutex_;                  // guards trim_soon_
  std::condition_variable_any wake_;  // woken by trim_soon() and by the thread's stop request
  bool trim_soon_ = false;
  std::jthread thread_;  // last: started once everything above exists, stopped first
};

}  // namespace hsm::agent
