#include "server/heap_trimmer.hpp"

#include <malloc.h>
#include <spdlog/spdlog.h>

#include <utility>

namespace hsm::agent {

bool HeapTrimmer::trim_heap() {
#if defined(__GLIBC__)
  return ::malloc_trim(0) == 1;
#else
  return false;  // other C libraries: nothing to do here
#endif
}

HeapTrimmer::HeapTrimmer(std::chrono::milliseconds interval, std::function<bool()> trim)
    : interval_(interval),
      trim_(std::move(trim)),
      thread_([this](const std::stop_token& stop) { run(stop); }) {}

void HeapTrimmer::trim_soon() {
  {
    std::lock_guard lock(mutex_);
    trim_soon_ = true;
  }
  wake_.notify_one();
}

void HeapTrimmer::run(const std::stop_token& stop) {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      // Returns when the interval is up, or at once when asked to trim or to stop.
      (void)wake_.wait_for(lock, stop, interval_, [this] { return trim_soon_; });
      trim_soon_ = false;
    }
    if (stop.stop_requested()) return;
    const auto started = std::chrono::steady_clock::now();
    const bool returned = trim_();
    spdlog::debug("heap trim: {} in {} us", returned ? "free pages returned" : "nothing to return",
                  std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - started)
                      .count());
  }
}

}  // namespace hsm::agent
