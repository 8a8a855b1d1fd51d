// BlockingPool: the threads for work that may block inside the token. Two kinds of task:
// - calls: token work a worker does not run on its own thread (worker.hpp: a slow token, a
//   method that may take long, a busy connection). At most `max_calls` run at once, one per
//   session the token may give (--max-sessions); at most `max_queue` more wait, and
//   submit_call() refuses beyond that (the caller answers `overloaded`) rather than queueing
//   without limit.
// - loop drives: a worker's event loop, run by a pool thread (at start, and when the thread that
//   ran it is stuck in an inline call: the watchdog in server.hpp). Never refused, never waiting
//   for a call's slot.
//
// It sizes itself: work that finds no idle thread starts one, and a thread idle for
// `idle_timeout` ends. So a slow token gets as many threads as calls it has in flight (Little's
// law, docs/performance.md), and a quiet agent keeps few.
//
// Idle threads wait each on its own condition variable, and work goes to the thread that went
// idle last: with one shared condition variable the kernel wakes an arbitrary waiter, and a lone
// client's calls would land on a different, cache-cold thread each time (docs/performance.md).
//
// Thread-safety: every member may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace hsm::agent {

class BlockingPool {
 public:
  using Task = std::function<void()>;

  struct Options {
    std::size_t max_calls = 64;
    std::size_t max_queue = 4096;
    std::chrono::milliseconds idle_timeout{30'000};
  };

  explicit BlockingPool(Options options);
  ~BlockingPool();  // stop()
  BlockingPool(const BlockingPool&) = delete;
  BlockingPool& operator=(const BlockingPool&) = delete;

  /// Runs `task` as a call: now when fewer than max_calls run, else after the calls queued before
  /// it. False when the queue is full or the pool is stopping (the task is dropped).
  [[nodiscard]] bool submit_call(Task task);
  /// Runs `task` as soon as a thread is free, starting one if none is. Dropped when stopping.
  void submit_drive(Task task);

  /// A call about to run outside the pool (inline, on a worker's loop thread) takes a call slot
  /// like the pool's own calls: false when all max_calls are taken (run it in the pool then).
  /// So calls wait in the queue, never for a session, whichever thread runs them.
  [[nodiscard]] bool try_take_call_slot();
  /// The call that took a slot with try_take_call_slot() has returned.
  void give_back_call_slot();

  /// Tasks running now (calls and drives).
  [[nodiscard]] std::size_t running() const;
  /// Threads alive now, idle or running.
  [[nodiscard]] std::size_t threads() const;

  /// Drops the queued calls and joins every thread. A thread inside a task is waited for: call
  /// only when running() is 0, or use abandon().
  void stop();
  /// Drops the queued calls and detaches every thread (the process exits without waiting for a
  /// thread stuck in the token; what such a thread uses is leaked, never freed under it).
  void abandon() noexcept;

 private:
  struct Job {
    Task task;
    bool call = false;
  };
  // One per thread; every field but `thread` guarded by mutex_.
  struct Thread {
    std::condition_variable wake;
    Job job;
    bool has_job = false;
    bool exited = false;
    std::thread thread;
  };

  /// Gives `job` to the thread that went idle last, or to a new thread. Under mutex_.
  void start_locked(Job job);
  void work(Thread& self);
  void stop_threads(bool join) noexcept;

  const Options options_;
  mutable std::mutex mutex_;
  std::deque<Task> queued_calls_;
  std::size_t calls_running_ = 0;
  std::size_t running_ = 0;
  std::vector<std::unique_ptr<Thread>> threads_;
  std::vector<Thread*> idle_;  // the most recently idle last
  bool stopping_ = false;
};

}  // namespace hsm::agent
