// One call of the client from start to completion, across retries: the request, its deadline,
// where it is in flight, and how it completes (a promise or a user callback).
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <utility>
#include <variant>

#include "hsm/client.hpp"
#include "hsm/protocol/types.hpp"
#include "timer_queue.hpp"

namespace hsm::client {

class Connection;

/// What an attempt came back with: the agent's result, or an error (the agent's or ours).
using Answer = std::variant<protocol::Result, Error>;

/// Whether the request of a failed attempt may have reached the agent; a request that certainly
/// did not may be sent again whatever the method.
enum class Delivery : std::uint8_t { kNotSent, kMaybeSent };

struct Failure {
  Error error;
  Delivery delivery = Delivery::kMaybeSent;
};

/// Turns the result of a method into the public type; throws Error(protocol_error) when the
/// result is not the method's.
template <class T>
using Converter = T (*)(protocol::Result&&);

/// Shared between the thread that started the call, the reader thread of the connection that
/// carries it, the timer thread and a thread requesting its stop. Completion happens exactly once
/// (finish()); everything else either runs on the one thread driving the current attempt (attempts
/// are sequential: the next starts only after the previous failed) or is guarded by mutex_.
class Call {
 public:
  struct InFlight {
    std::weak_ptr<Connection> connection;
    std::uint32_t msgid = 0;
  };

  Call(protocol::Request request, Clock::time_point deadline, bool idempotent)
      : request_(std::move(request)),
        method_(request_.method),
        deadline_(deadline),
        idempotent_(idempotent) {}
  virtual ~Call() = default;
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;
  Call(Call&&) = delete;
  Call& operator=(Call&&) = delete;

  /// The request; msgid and timeout_ms are rewritten by each attempt, on its thread only.
  [[nodiscard]] protocol::Request& request() noexcept { return request_; }
  [[nodiscard]] protocol::Method method() const noexcept { return method_; }
  [[nodiscard]] Clock::time_point deadline() const noexcept { return deadline_; }
  /// Safe to send again after an answer may have been lost (sign, verify, reads).
  [[nodiscard]] bool idempotent() const noexcept { return idempotent_; }
  /// Callback calls never complete on a caller's thread (one that starts a call or requests a
  /// stop; see client.hpp): the runner hands such completions to the timer thread.
  [[nodiscard]] virtual bool completes_on_client_thread() const noexcept = 0;
  /// The thread that started the call waits for it, and may read its answer itself
  /// (CallRunner::read_answer_here()).
  [[nodiscard]] virtual bool caller_waits() const noexcept { return false; }

  [[nodiscard]] bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }
  /// Completes the call with `answer` unless it already completed. True when this did it.
  bool finish(Answer&& answer) noexcept {
    if (finished_.exchange(true, std::memory_order_acq_rel)) {
      return false;
    }
    complete(std::move(answer));
    return true;
  }

  /// Starts the next attempt; returns its number (1 for the first).
  std::uint32_t begin_attempt() noexcept {
    return attempts_.fetch_add(1, std::memory_order_relaxed) + 1;
  }
  [[nodiscard]] std::uint32_t attempts() const noexcept {
    return attempts_.load(std::memory_order_relaxed);
  }

  /// Where the current attempt waits for its answer (so a timeout can withdraw it).
  void set_in_flight(InFlight in_flight) {
    std::lock_guard lock(mutex_);
    in_flight_ = std::move(in_flight);
  }
  std::optional<InFlight> take_in_flight() {
    std::lock_guard lock(mutex_);
    return std::exchange(in_flight_, std::nullopt);
  }
  [[nodiscard]] std::optional<InFlight> in_flight() {
    std::lock_guard lock(mutex_);
    return in_flight_;
  }

  /// The timer that fails an asynchronous call at its deadline (cancelled on completion).
  void set_deadline_timer(TimerQueue::Handle handle) {
    std::lock_guard lock(mutex_);
    deadline_timer_ = handle;
  }
  std::optional<TimerQueue::Handle> take_deadline_timer() {
    std::lock_guard lock(mutex_);
    return std::exchange(deadline_timer_, std::nullopt);
  }

  /// Runs `on_stop` when `stop` is requested (at once, on this thread, when it already was).
  /// Called once, by the thread starting the call, before the first attempt.
  void watch_stop(const std::stop_token& stop, std::function<void()> on_stop) {
    stop_watch_.emplace(stop, std::move(on_stop));
  }

 protected:
  /// Delivers the answer to whoever waits; called once. Must not throw.
  virtual void complete(Answer&& answer) noexcept = 0;
  /// For derived destructors: a call dropped before it completed (the client is closing)
  /// still reports, so no future is left broken and no callback is forgotten.
  void finish_abandoned() noexcept {
    // Nearly every call has finished by now: build the error (two strings) only when it has
    // not, instead of on every call's destruction (docs/performance.md).
    if (finished_.load(std::memory_order_acquire)) return;
    finish(Error(Errc::kConnectionFailed, "the client was closed before the call completed"));
  }

 private:
  protocol::Request request_;
  const protocol::Method method_;
  const Clock::time_point deadline_;
  const bool idempotent_;
  std::atomic<bool> finished_{false};
  std::atomic<std::uint32_t> attempts_{0};
  std::mutex mutex_;
  std::optional<InFlight> in_flight_;
  std::optional<TimerQueue::Handle> deadline_timer_;
  // Declared last: destroyed first, so a stop callback running on another thread is waited for
  // before the rest of the call goes.
  std::optional<std::stop_callback<std::function<void()>>> stop_watch_;
};

/// A call completed through a std::promise of the value (the public future forms).
template <class T>
class FutureCall final : public Call {
 public:
  FutureCall(protocol::Request request, Clock::time_point deadline, bool idempotent,
             Converter<T> convert)
      : Call(std::move(request), deadline, idempotent), convert_(convert) {}
  ~FutureCall() override { finish_abandoned(); }
  FutureCall(const FutureCall&) = delete;
  FutureCall& operator=(const FutureCall&) = delete;
  FutureCall(FutureCall&&) = delete;
  FutureCall& operator=(FutureCall&&) = delete;

  [[nodiscard]] std::future<T> future() { return promise_.get_future(); }
  [[nodiscard]] bool completes_on_client_thread() const noexcept override { return false; }

 private:
  void complete(Answer&& answer) noexcept override {
    try {
      if (auto* error = std::get_if<Error>(&answer)) {
        promise_.set_exception(std::make_exception_ptr(std::move(*error)));
      } else {
        promise_.set_value(convert_(std::get<protocol::Result>(std::move(answer))));
      }
    } catch (...) {
      try {
        promise_.set_exception(std::current_exception());
      } catch (...) {  // already satisfied: cannot happen, finish() runs complete() once
      }
    }
  }

  std::promise<T> promise_;
  Converter<T> convert_;
};

/// A synchronous call: the caller blocks in take() until the call completed (an answer, a
/// failure, its deadline enforced by the timer thread, or a stop). The error travels as a
/// value, thrown on the caller's thread, so no exception object is shared between threads
/// (ThreadSanitizer cannot see libstdc++'s exception_ptr reference counting).
template <class T>
class SyncCall final : public Call {
 public:
  SyncCall(protocol::Request request, Clock::time_point deadline, bool idempotent,
           Converter<T> convert)
      : Call(std::move(request), deadline, idempotent), convert_(convert) {}
  ~SyncCall() override { finish_abandoned(); }
  SyncCall(const SyncCall&) = delete;
  SyncCall& operator=(const SyncCall&) = delete;
  SyncCall(SyncCall&&) = delete;
  SyncCall& operator=(SyncCall&&) = delete;

  [[nodiscard]] bool completes_on_client_thread() const noexcept override { return false; }
  [[nodiscard]] bool caller_waits() const noexcept override { return true; }

  /// The outcome; blocks until the call completed. Called once, by the thread that made it.
  [[nodiscard]] Outcome<T> take() {
    done_.wait(false, std::memory_order_acquire);
    return std::move(*outcome_);
  }

 private:
  void complete(Answer&& answer) noexcept override {
    try {
      outcome_.emplace(make_outcome(std::move(answer)));
    } catch (...) {  // out of memory while converting
      outcome_.emplace(Error(Errc::kInternal, "out of memory while reading the answer"));
    }
    // Publishes outcome_. The completing thread holds a reference to the call, so the waiter
    // cannot free it under notify_one().
    done_.store(true, std::memory_order_release);
    done_.notify_one();
  }

  Outcome<T> make_outcome(Answer&& answer) {
    if (auto* error = std::get_if<Error>(&answer)) {
      return std::move(*error);
    }
    try {
      return convert_(std::get<protocol::Result>(std::move(answer)));
    } catch (const Error& mismatch) {
      return mismatch;
    }
  }

  Converter<T> convert_;
  std::optional<Outcome<T>> outcome_;  // written once by complete(), read after done_
  std::atomic<bool> done_{false};
};

/// A call completed by running the user's callback.
template <class T>
class CallbackCall final : public Call {
 public:
  CallbackCall(protocol::Request request, Clock::time_point deadline, bool idempotent,
               Converter<T> convert, Callback<T> done)
      : Call(std::move(request), deadline, idempotent), convert_(convert), done_(std::move(done)) {}
  ~CallbackCall() override { finish_abandoned(); }
  CallbackCall(const CallbackCall&) = delete;
  CallbackCall& operator=(const CallbackCall&) = delete;
  CallbackCall(CallbackCall&&) = delete;
  CallbackCall& operator=(CallbackCall&&) = delete;

  [[nodiscard]] bool completes_on_client_thread() const noexcept override { return true; }

 private:
  void complete(Answer&& answer) noexcept override {
    try {
      std::optional<Outcome<T>> outcome;
      if (auto* error = std::get_if<Error>(&answer)) {
        outcome.emplace(std::move(*error));
      } else {
        try {
          outcome.emplace(convert_(std::get<protocol::Result>(std::move(answer))));
        } catch (const Error& mismatch) {
          outcome.emplace(mismatch);
        }
      }
      if (done_) {
        done_(std::move(*outcome));
      }
    } catch (...) {
      // Documented: exceptions escaping a callback are dropped (there is nobody to give them to).
    }
    done_ = nullptr;  // release what the callback captured now, not when the call is freed
  }

  Converter<T> convert_;
  Callback<T> done_;
};

}  // namespace hsm::client
