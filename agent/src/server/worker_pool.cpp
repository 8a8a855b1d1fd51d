#include "server/worker_pool.hpp"

namespace hsm::agent {

WorkerPool::WorkerPool(std::size_t threads, std::size_t max_running, std::size_t max_queue,
                       RunFunction run, LoopDuty loop_duty)
    : run_(std::move(run)),
      loop_duty_(std::move(loop_duty)),
      max_running_(max_running),
      max_queue_(max_queue) {
  sleepers_.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i) sleepers_.push_back(std::make_unique<Sleeper>());
  idle_.reserve(threads);
  threads_.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this, i] { work(i); });
}

WorkerPool::~WorkerPool() {
  stop();
}

bool WorkerPool::submit(std::shared_ptr<Call> call) {
  Sleeper* to_wake = nullptr;
  {
    std::lock_guard lock(mutex_);
    if (stopping_ || queue_.size() >= max_queue_) return false;
    queue_.push_back(std::move(call));
    if (running_ < max_running_) to_wake = pop_idle_locked();
  }
  // Every busy worker takes the next queued call when it finishes, so a call that found no idle
  // worker is picked up without a wake-up.
  if (to_wake != nullptr) to_wake->wake.notify_one();
  return true;
}

void WorkerPool::want_loop_runner() {
  Sleeper* to_wake = nullptr;
  {
    std::lock_guard lock(mutex_);
    if (stopping_ || !loop_duty_) return;
    loop_wanted_ = true;
    to_wake = pop_idle_locked();
  }
  if (to_wake != nullptr) to_wake->wake.notify_one();
}

void WorkerPool::run_outside_queue() {
  std::lock_guard lock(mutex_);
  ++running_;
}

void WorkerPool::run_outside_queue_done() {
  Sleeper* to_wake = nullptr;
  {
    std::lock_guard lock(mutex_);
    --running_;
    if (!queue_.empty()) to_wake = pop_idle_locked();
  }
  if (to_wake != nullptr) to_wake->wake.notify_one();
}

WorkerPool::Sleeper* WorkerPool::pop_idle_locked() {
  if (idle_.empty()) return nullptr;
  Sleeper* sleeper = sleepers_[idle_.back()].get();
  idle_.pop_back();
  sleeper->woken = true;
  return sleeper;
}

std::size_t WorkerPool::queued() const {
  std::lock_guard lock(mutex_);
  return queue_.size();
}

void WorkerPool::work(std::size_t index) {
  Sleeper& self = *sleepers_[index];
  std::unique_lock lock(mutex_);
  for (;;) {
    while ((queue_.empty() || running_ >= max_running_) && !loop_wanted_ && !stopping_) {
      idle_.push_back(index);
      self.wake.wait(lock, [&] { return self.woken || stopping_; });
      if (!self.woken) {
        // Woken by stop(), still listed as idle: leave the list consistent.
        std::erase(idle_, index);
      }
      self.woken = false;
    }
    if (loop_wanted_ && !stopping_) {
      loop_wanted_ = false;
      lock.unlock();
      loop_duty_();
      lock.lock();
      continue;
    }
    if (queue_.empty()) return;  // stopping and drained
    std::shared_ptr<Call> call = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    lock.unlock();
    run_(call);
    call.reset();  // release the call before sleeping, not when the next one arrives
    lock.lock();
    --running_;
  }
}

void WorkerPool::stop_locked_and_wake_all(std::unique_lock<std::mutex>& lock) {
  stopping_ = true;
  lock.unlock();
  for (auto& sleeper : sleepers_) sleeper->wake.notify_all();
}

void WorkerPool::stop() {
  {
    std::unique_lock lock(mutex_);
    stop_locked_and_wake_all(lock);
  }
  for (auto& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
  threads_.clear();
}

void WorkerPool::abandon() noexcept {
  {
    std::unique_lock lock(mutex_);
    queue_.clear();
    stop_locked_and_wake_all(lock);
  }
  for (auto& thread : threads_) {
    if (thread.joinable()) thread.detach();
  }
  threads_.clear();
}

}  // namespace hsm::agent
