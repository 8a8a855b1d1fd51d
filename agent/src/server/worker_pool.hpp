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
// The workers also run the event loop, one at a time (server/loop_turn.hpp): want_loop_runner()
// has an idle worker, or the next one to finish its call, run `loop_duty`, before any queued call.
// At most `max_running` queued calls run at once (one per session), and there are more threads
// than that: so a thread is always free to run the loop, even while every session is taken and
// a call waits for one (issue 15: a loop handed over to no one answered deadlines 290 ms late).
//
// Thread-safety: submit() and want_loop_runner() from any thread; the run function and the loop
// duty are called on worker threads, concurrently.
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
  using LoopDuty = std::function<void()>;

  /// `threads` workers, of which at most `max_running` run queued calls at once.
  WorkerPool(std::size_t threads, std::size_t max_running, std::size_t max_queue, RunFunction run,
             LoopDuty loop_duty = {});
  ~WorkerPool();  // stops and joins (see stop())
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// Queues a call. False when the queue is full or the pool is stopping.
  [[nodiscard]] bool submit(std::shared_ptr<Call> call);
  /// Has one worker run the loop duty: the most recently idle one, or else the first to finish.
  void want_loop_runner();
  /// A call runs outside the queue (inline, on the thread that held the loop): it counts
  /// against `max_running` until run_outside_queue_done(), so queued calls wait in the queue
  /// rather than for its session.
  void run_outside_queue();
  void run_outside_queue_done();
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

  /// Wakes the most recently idle worker, if any; under mutex_. Returns whom to notify.
  Sleeper* pop_idle_locked();

  RunFunction run_;
  LoopDuty loop_duty_;
  bool loop_wanted_ = false;
  std::size_t max_running_;
  std::size_t running_ = 0;  // queued calls being run now
  std::size_t max_queue_;
  mutable std::mutex mutex_;
  std::deque<std::shared_ptr<Call>> queue_;
  std::vector<std::unique_ptr<Sleeper>> sleepers_;
  std::vector<std::size_t> idle_;  // indexes of sleeping workers, the most recent last
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace hsm::agent
