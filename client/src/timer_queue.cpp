#include "timer_queue.hpp"

namespace hsm::client {

TimerQueue::~TimerQueue() {
  stop();
}

std::optional<TimerQueue::Handle> TimerQueue::schedule(Clock::time_point when,
                                                       std::function<void()> task) {
  std::unique_lock lock(mutex_);
  if (stopping_) {
    return std::nullopt;
  }
  if (!thread_.joinable()) {
    thread_ = std::thread([this] { run(); });
  }
  const Key key{when, next_sequence_++};
  tasks_.emplace(key, std::move(task));
  // A thread that is awake looks at the queue before it sleeps again; one that sleeps needs
  // waking only when this task is due before it would wake up anyway.
  const bool wake = when < sleeping_until_;
  if (wake) {
    sleeping_until_ = Clock::time_point::min();  // one notification is enough
  }
  lock.unlock();
  if (wake) {
    wakeup_.notify_one();
  }
  return Handle{key.first, key.second};
}

bool TimerQueue::cancel(const Handle& handle) {
  std::function<void()> removed;  // destroyed after the lock is released
  std::lock_guard lock(mutex_);
  auto it = tasks_.find(Key{handle.when, handle.sequence});
  if (it == tasks_.end()) {
    return false;
  }
  removed = std::move(it->second);
  tasks_.erase(it);
  return true;
}

void TimerQueue::stop() noexcept {
  std::map<Key, std::function<void()>> discarded;
  std::thread thread;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    thread = std::move(thread_);
  }
  wakeup_.notify_one();
  if (thread.joinable()) {
    thread.join();
  }
  {
    std::lock_guard lock(mutex_);
    discarded.swap(tasks_);
  }
  // Destroyed here, without the lock: a task's destructor may complete a call, whose callback
  // may try to schedule (and is refused, since stopping_ is set).
  discarded.clear();
}

void TimerQueue::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (tasks_.empty()) {
      sleeping_until_ = Clock::time_point::max();
      wakeup_.wait(lock);
      sleeping_until_ = Clock::time_point::min();
      continue;
    }
    auto first = tasks_.begin();
    // A copy: the task may be cancelled (its node freed) while this thread waits.
    const Clock::time_point due = first->first.first;
    if (Clock::now() < due) {
      sleeping_until_ = due;
      wakeup_.wait_until(lock, due);
      sleeping_until_ = Clock::time_point::min();
      continue;
    }
    auto task = std::move(first->second);
    tasks_.erase(first);
    lock.unlock();
    try {
      task();
    } catch (...) {
      // Tasks report their own failures; one that throws must not take the timer thread down.
    }
    task = nullptr;  // release what it captured before taking the lock again
    lock.lock();
  }
}

}  // namespace hsm::client
