// A mutex whose lock can give up at a deadline, built on std::mutex and
// std::condition_variable.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace hsm::client {

/// Lockable and TimedLockable (works with std::unique_lock::try_lock_until). Used instead of
/// std::timed_mutex because libstdc++ implements that with pthread_mutex_clocklock, which
/// ThreadSanitizer does not understand (every unlock is reported as "unlock of an unlocked
/// mutex"), and the tsan preset must stay usable for everything that links the client.
class DeadlineMutex {
 public:
  void lock() {
    std::unique_lock guard(mutex_);
    released_.wait(guard, [this] { return !held_; });
    held_ = true;
  }

  bool try_lock() {
    std::lock_guard guard(mutex_);
    if (held_) {
      return false;
    }
    held_ = true;
    return true;
  }

  template <class Clock, class Duration>
  bool try_lock_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    std::unique_lock guard(mutex_);
    if (!released_.wait_until(guard, deadline, [this] { return !held_; })) {
      return false;
    }
    held_ = true;
    return true;
  }

  void unlock() {
    {
      std::lock_guard guard(mutex_);
      held_ = false;
    }
    released_.notify_one();
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  bool held_ = false;  // guarded by mutex_
};

}  // namespace hsm::client
