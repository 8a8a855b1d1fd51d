// WorkerPool: the threads that run blocking PKCS#11 work, off the libuv loop thread. One thread
// per pooled session, so a hung token call occupies one worker and the others keep going.
// A bounded FIFO queue sits in front: submit() refuses (the caller answers `overloaded`) rather
// than queueing without limit.
//
// Each worker sleeps on its own condition variable, and submit() wakes the worker that went
// idle last. With one shared condition variable the kernel wakes an arbitrary waiter, so at low
// concurrency every request lands on a different, cache-cold thread; waking the most recently
// idle one keeps a lone client's requests on one warm thread (docs/performance.md).
//
// Thread-safety: submit() from any thread (in practice the loop thread); the run function is
// called on worker threads, concurrently.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "server/call.hpp"

namespace hsm::agent {

class WorkerPool {
 public:
  using RunFunction = std::function<void(const std::shared_ptr<Call>&)>;

  WorkerPool(std::size_t threads, std::size_t max_queue, RunFunction run);
  ~WorkerPool();  // stops and joins (see stop())
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Queues a call. False when the queue is full or the pool is stopping.
  [[nodiscard]] bool submit(std::shared_ptr<Call> call);
  /// Calls queued and not yet taken by a worker.
  [[nodiscard]] std::size_t queued() const;
  /// Stops taking new work, lets the workers finish what is queued, and joins them. A worker
  /// stuck in a hung HSM call is waited for: call only after the token was given up on or when
  /// every call has answered (the server drains before stopping).
  void stop();
  /// Detaches the workers instead of joining (used when the process exits at once).
  void abandon() noexcept;

 private:
  // One per worker thread; guarded by mutex_.
  struct Sleeper {
    std::condition_variable wake;
    bool woken = false;
  };

  void work(std::size_t index);
  void stop_locked_and_wake_all(std::unique_lock<std::mutex>& lock);

  RunFunction run_;
  std::size_t max_queue_;
  mutable std::mutex mutex_;
  std::deque<std::shared_ptr<Call>> queue_;
  std::vector<std::unique_ptr<Sleeper>> sleepers_;
  std::vector<std::size_t> idle_;  // indexes of sleeping workers, the most recent last
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace hsm::agent
