#include "server/blocking_pool.hpp"

#include <pthread.h>

#include <algorithm>

namespace hsm::agent {

BlockingPool::BlockingPool(Options options) : options_(options) {}

BlockingPool::~BlockingPool() {
  stop();
}

bool BlockingPool::submit_call(Task task) {
  std::lock_guard lock(mutex_);
  if (stopping_) return false;
  if (calls_running_ < options_.max_calls) {
    ++calls_running_;
    start_locked({std::move(task), true});
    return true;
  }
  if (queued_calls_.size() >= options_.max_queue) return false;
  queued_calls_.push_back(std::move(task));  // taken by the next thread to finish a call
  return true;
}

void BlockingPool::submit_drive(Task task) {
  std::lock_guard lock(mutex_);
  if (stopping_) return;
  start_locked({std::move(task), false});
}

bool BlockingPool::try_take_call_slot() {
  std::lock_guard lock(mutex_);
  if (stopping_ || calls_running_ >= options_.max_calls) return false;
  ++calls_running_;
  return true;
}

void BlockingPool::give_back_call_slot() {
  std::lock_guard lock(mutex_);
  if (!queued_calls_.empty() && !stopping_) {
    Task next = std::move(queued_calls_.front());
    queued_calls_.pop_front();
    start_locked({std::move(next), true});  // the slot passes to it
    return;
  }
  --calls_running_;
}

void BlockingPool::start_locked(Job job) {
  ++running_;
  if (!idle_.empty()) {
    Thread* worker = idle_.back();
    idle_.pop_back();
    worker->job = std::move(job);
    worker->has_job = true;
    worker->wake.notify_one();
    return;
  }
  // Threads that ended idle are joined here: under the mutex they have left it for good.
  std::erase_if(threads_, [](const std::unique_ptr<Thread>& worker) {
    if (!worker->exited) return false;
    worker->thread.join();
    return true;
  });
  auto worker = std::make_unique<Thread>();
  worker->job = std::move(job);
  worker->has_job = true;
  Thread& started = *worker;
  threads_.push_back(std::move(worker));
  started.thread = std::thread([this, &started] { work(started); });
}

void BlockingPool::work(Thread& self) {
  pthread_setname_np(pthread_self(), "hsm-pool");
  std::unique_lock lock(mutex_);
  for (;;) {
    while (self.has_job) {
      Job job = std::move(self.job);
      self.has_job = false;
      lock.unlock();
      job.task();
      job.task = nullptr;  // what it holds goes now, not when the next job comes
      if (!job.call) pthread_setname_np(pthread_self(), "hsm-pool");  // a loop drive ended
      lock.lock();
      --running_;
      if (!job.call) continue;
      if (!queued_calls_.empty() && !stopping_) {
        ++running_;
        self.job = {std::move(queued_calls_.front()), true};  // keeps its call slot
        queued_calls_.pop_front();
        self.has_job = true;
      } else {
        --calls_running_;
      }
    }
    if (stopping_) break;
    idle_.push_back(&self);
    const bool woken =
        self.wake.wait_for(lock, options_.idle_timeout, [&] { return self.has_job || stopping_; });
    if (!self.has_job) {
      std::erase(idle_, &self);  // timed out, or stopping: no longer idle here
      if (!woken) break;         // idle too long: this thread ends
    }
  }
  self.exited = true;
}

std::size_t BlockingPool::running() const {
  std::lock_guard lock(mutex_);
  return running_;
}

std::size_t BlockingPool::threads() const {
  std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(std::count_if(
      threads_.begin(), threads_.end(), [](const auto& worker) { return !worker->exited; }));
}

void BlockingPool::stop_threads(bool join) noexcept {
  std::vector<std::unique_ptr<Thread>> workers;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    queued_calls_.clear();
    for (Thread* worker : idle_) worker->wake.notify_one();
    workers.swap(threads_);
  }
  for (auto& worker : workers) {
    if (!worker->thread.joinable()) continue;
    if (join) {
      worker->thread.join();
    } else {
      worker->thread.detach();
      (void)worker.release();  // a detached thread may still use it
    }
  }
}

void BlockingPool::stop() {
  stop_threads(true);
}

void BlockingPool::abandon() noexcept {
  stop_threads(false);
}

}  // namespace hsm::agent
