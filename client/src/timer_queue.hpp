// A single thread that runs tasks at given times: retries after their backoff, deadlines of
// asynchronous calls, and callbacks of calls that failed before anything was sent.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace hsm::client {

using Clock = std::chrono::steady_clock;

/// Thread-safe. Tasks run one at a time on the queue's own thread (started by the first
/// schedule()), in time order, without the queue's lock held, so a task may schedule or cancel
/// others. stop() (and the destructor) joins the thread and destroys the tasks that did not run
/// without running them; a task that must report something on that path does it from its
/// destructor (see Call).
class TimerQueue {
 public:
  struct Handle {
    Clock::time_point when;
    std::uint64_t sequence = 0;
  };

  TimerQueue() = default;
  ~TimerQueue();
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;
  TimerQueue(TimerQueue&&) = delete;
  TimerQueue& operator=(TimerQueue&&) = delete;

  /// Runs `task` at `when` (at once when it is in the past). nullopt after stop(): the task is
  /// destroyed without running.
  std::optional<Handle> schedule(Clock::time_point when, std::function<void()> task);
  /// Removes a task that has not started. True when it was removed.
  bool cancel(const Handle& handle);
  /// Stops the thread (waiting for a running task) and destroys the remaining tasks. Must not be
  /// called from a task.
  void stop() noexcept;

 private:
  void run();

  using Key = std::pair<Clock::time_point, std::uint64_t>;
  std::mutex mutex_;
  std::condition_variable wakeup_;
  std::map<Key, std::function<void()>> tasks_;  // ordered by time, then by scheduling order
  std::uint64_t next_sequence_ = 0;
  bool stopping_ = false;
  // When the thread waits, the time it will wake up by itself (max: no task); min while it is
  // awake. schedule() wakes it only for an earlier task, so the usual pattern of asynchronous
  // calls (a deadline scheduled, then cancelled when the answer comes) costs no wake-ups.
  Clock::time_point sleeping_until_ = Clock::time_point::min();
  std::thread thread_;
};

}  // namespace hsm::client
