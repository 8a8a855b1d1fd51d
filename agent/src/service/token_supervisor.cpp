#include "service/token_supervisor.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "hsm/common/backoff.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
#include "service/token_state.hpp"

namespace hsm::agent {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// A recovery held up by a call that does not return says so this often, not on every slice.
constexpr milliseconds kBusyLogInterval{10000};

long long ms_of(Clock::duration duration) {
  return std::chrono::duration_cast<milliseconds>(duration).count();
}

}  // namespace

class TokenSupervisor::Core {
 public:
  Core(TokenState& state, HealthState& health, AgentMetrics& metrics, SupervisorOptions options)
      : state_(state),
        health_(health),
        metrics_(metrics),
        options_(options),
        backoff_(std::max(options.first_backoff, milliseconds{1}), options.max_backoff) {
    metrics_.hsm_up.Set(state_.is_down() ? 0 : 1);
  }

  void set_serving() {
    std::lock_guard lock(mutex_);
    serving_ = true;
    publish_readiness_locked();
  }

  // TokenState's down listener: wakes the supervisor thread.
  void on_token_down() {
    {
      std::lock_guard lock(mutex_);
      down_signalled_ = true;
    }
    wake_.notify_all();
  }

  void request_stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    probe_wake_.notify_all();
  }

  [[nodiscard]] bool wait_exited(milliseconds timeout) {
    std::unique_lock lock(mutex_);
    return exited_.wait_for(lock, timeout, [this] { return running_threads_ == 0; });
  }

  void thread_started() {
    std::lock_guard lock(mutex_);
    ++running_threads_;
  }

  void run_supervisor() noexcept {
    ExitNotice notice(*this);
    try {
      supervise();
    } catch (const std::exception& e) {
      // Nothing in the loop should throw; if it does, say so loudly and stay not ready rather
      // than take the process down.
      spdlog::error("token supervisor stopped: {}", e.what());
      health_.set_not_ready(std::string("token supervisor stopped: ") + e.what());
    }
  }

  void run_prober() noexcept {
    ExitNotice notice(*this);
    std::unique_lock lock(mutex_);
    for (;;) {
      probe_wake_.wait(lock, [this] { return stopping_ || probe_requested_; });
      if (stopping_) return;
      probe_requested_ = false;
      lock.unlock();
      ProbeResult result = state_.probe();  // the real call; may block on the token
      if (result.ran) {
        metrics_.hsm_probe_duration_seconds.Observe(
            std::chrono::duration<double>(result.duration).count());
      }
      lock.lock();
      probe_in_flight_ = false;
      probe_result_ = std::move(result);
      wake_.notify_all();
    }
  }

 private:
  // Counts a thread out when it ends, however it ends.
  class ExitNotice {
   public:
    explicit ExitNotice(Core& core) : core_(core) {}
    ~ExitNotice() {
      {
        std::lock_guard lock(core_.mutex_);
        --core_.running_threads_;
      }
      core_.exited_.notify_all();
    }
    ExitNotice(const ExitNotice&) = delete;
    ExitNotice& operator=(const ExitNotice&) = delete;

   private:
    Core& core_;
  };

  void supervise() {
    std::unique_lock lock(mutex_);
    next_probe_ = Clock::now() + options_.probe_interval;
    publish_readiness_locked();
    while (!stopping_) {
      const auto now = Clock::now();
      if (probe_result_) {
        ProbeResult result = std::move(*probe_result_);
        probe_result_.reset();
        apply_probe(lock, result);
        continue;
      }
      if (state_.is_down()) {
        if (!handling_down_) begin_down_locked(now);
        if (attempts_over_ || now < next_attempt_) {
          // A refused PIN is never retried: then wait for stop() (or a late probe result) only.
          const auto woken = [this] { return stopping_ || probe_result_.has_value(); };
          if (attempts_over_) {
            wake_.wait(lock, woken);
          } else {
            wake_.wait_until(lock, next_attempt_, woken);
          }
          continue;
        }
        lock.unlock();
        const Recovery recovery = state_.reinitialise(options_.drain_wait);
        lock.lock();
        if (recovery.result != Recovery::Result::kBusy) ++episode_attempts_;
        handle_recovery_locked(recovery);
        continue;
      }
      handling_down_ = false;  // up again (published by someone else than us: not expected)
      if (probe_in_flight_ && !probe_overdue_ && now - probe_started_ >= options_.probe_timeout) {
        probe_overdue_ = true;
        const std::uint64_t generation = probe_generation_;
        lock.unlock();
        (void)state_.mark_down(generation,
                               "token probe has not answered for " +
                                   std::to_string(options_.probe_timeout.count()) + " ms",
                               std::nullopt);
        lock.lock();
        continue;
      }
      if (!probe_in_flight_ && now >= next_probe_) {
        probe_in_flight_ = true;
        probe_requested_ = true;
        probe_overdue_ = false;
        probe_started_ = now;
        probe_generation_ = state_.generation_number();
        probe_wake_.notify_all();
      }
      const auto woken = [this] {
        return stopping_ || down_signalled_ || probe_result_.has_value();
      };
      if (!probe_in_flight_) {
        wake_.wait_until(lock, next_probe_, woken);
      } else if (!probe_overdue_) {
        wake_.wait_until(lock, probe_started_ + options_.probe_timeout, woken);
      } else {
        wake_.wait(lock, woken);  // the hung probe's token is down; its return wakes us
      }
      down_signalled_ = false;
    }
  }

  // The token just went down (a request's fault, a failed or hung probe).
  void begin_down_locked(Clock::time_point now) {
    handling_down_ = true;
    down_signalled_ = false;
    down_since_ = now;
    episode_attempts_ = 0;
    last_attempt_error_.clear();
    busy_note_.clear();
    metrics_.hsm_up.Set(0);
    // A token that failed again soon after a recovery keeps backing off; one that had been
    // healthy for a while gets an immediate first attempt.
    if (now - last_recovered_ >= options_.stable_after) backoff_attempts_ = 0;
    next_attempt_ = now + next_backoff_locked();
    publish_readiness_locked();
  }

  /// The wait before the next re-initialisation attempt; counts that attempt.
  Clock::duration next_backoff_locked() {
    const std::uint32_t attempt = backoff_attempts_;
    if (backoff_attempts_ < UINT32_MAX) ++backoff_attempts_;
    return backoff_.delay(attempt);
  }

  void handle_recovery_locked(const Recovery& recovery) {
    const auto now = Clock::now();
    switch (recovery.result) {
      case Recovery::Result::kRecovered:
        spdlog::info("token re-initialised ({}) after {} attempt(s); it was down for {} ms",
                     recovery.detail, episode_attempts_, ms_of(now - down_since_));
        handling_down_ = false;
        last_recovered_ = now;
        last_attempt_error_.clear();
        busy_note_.clear();
        probe_ok_ = true;  // the re-initialisation itself just talked to the token
        metrics_.hsm_up.Set(1);
        next_probe_ = now;  // and a probe confirms it at once
        break;
      case Recovery::Result::kAlreadyUp:
        handling_down_ = false;
        break;
      case Recovery::Result::kBusy:
        busy_note_ = recovery.detail;
        if (now - last_busy_log_ >= kBusyLogInterval) {
          last_busy_log_ = now;
          spdlog::warn("token re-initialisation is {}; the token stays down meanwhile",
                       recovery.detail);
        }
        next_attempt_ = now;  // the drain wait itself paced this attempt
        break;
      case Recovery::Result::kFailed: {
        const auto delay = next_backoff_locked();
        next_attempt_ = now + delay;
        last_attempt_error_ = recovery.detail;
        busy_note_.clear();
        spdlog::warn("re-initialising the token failed (attempt {}): {}; next attempt in {} ms",
                     episode_attempts_, recovery.detail, ms_of(delay));
        break;
      }
      case Recovery::Result::kPinRejected:
        attempts_over_ = true;
        if (!pin_rejected_) {
          pin_rejected_ = recovery.detail;
          spdlog::error(
              "{}. The agent stays up and not ready, and never logs in again by itself (a "
              "retry can lock the token)",
              recovery.detail);
        }
        break;
      case Recovery::Result::kClosed:
        attempts_over_ = true;  // nothing more to attempt: wait for stop()
        break;
    }
    publish_readiness_locked();
  }

  void apply_probe(std::unique_lock<std::mutex>& lock, const ProbeResult& result) {
    if (!result.ran) return;  // the token was down when the probe started
    // A probe of a generation that has since been replaced says nothing about the current one.
    if (result.generation != state_.generation_number()) return;
    next_probe_ = Clock::now() + options_.probe_interval;
    if (result.ok) {
      probe_ok_ = true;
      metrics_.hsm_up.Set(1);
      publish_readiness_locked();
      return;
    }
    probe_ok_ = false;
    probe_error_ = result.error;
    metrics_.hsm_up.Set(0);
    publish_readiness_locked();
    lock.unlock();
    // Outside our lock: mark_down calls back into on_token_down().
    (void)state_.mark_down(result.generation, "token probe failed: " + result.error, result.ckr);
    lock.lock();
  }

  void publish_readiness_locked() {
    if (!serving_) return;  // HealthState says "starting" until the server listens
    std::optional<std::string> reason;
    if (pin_rejected_) {
      reason = *pin_rejected_;  // names the refusal and its remedy (TokenState::reinitialise)
    } else if (state_.is_down()) {
      const auto fault = state_.fault();
      reason = "token down (" + (fault ? fault->reason : std::string("unknown fault")) +
               "); re-initialising";
      if (!last_attempt_error_.empty()) {
        *reason += "; last attempt: " + last_attempt_error_;
      } else if (!busy_note_.empty()) {
        *reason += "; " + busy_note_;
      }
    } else if (!probe_ok_) {
      reason = "token probe failed: " + probe_error_;
    }
    if (reason) {
      health_.set_not_ready(std::move(*reason));
    } else {
      health_.set_ready();
    }
  }

  TokenState& state_;
  HealthState& health_;
  AgentMetrics& metrics_;
  const SupervisorOptions options_;

  std::mutex mutex_;
  std::condition_variable wake_;        // the supervisor thread
  std::condition_variable probe_wake_;  // the prober thread
  std::condition_variable exited_;      // stop()
  // Everything below is guarded by mutex_.
  unsigned running_threads_ = 0;
  bool stopping_ = false;
  bool serving_ = false;
  bool down_signalled_ = false;

  // The current down episode.
  bool handling_down_ = false;
  const common::Backoff backoff_;
  std::uint32_t backoff_attempts_ = 0;  // since the last stable period: 0 makes the next immediate
  Clock::time_point down_since_{};
  unsigned episode_attempts_ = 0;  // re-initialisations tried since the token went down
  Clock::time_point next_attempt_{};
  Clock::time_point last_recovered_{};
  Clock::time_point last_busy_log_{};
  std::string last_attempt_error_;
  std::string busy_note_;
  std::optional<std::string> pin_rejected_;
  bool attempts_over_ = false;  // the PIN was refused, or the token state was closed

  // The probe.
  bool probe_requested_ = false;
  bool probe_in_flight_ = false;
  bool probe_overdue_ = false;
  Clock::time_point probe_started_{};
  Clock::time_point next_probe_{};
  std::uint64_t probe_generation_ = 0;
  std::optional<ProbeResult> probe_result_;
  bool probe_ok_ = true;
  std::string probe_error_;
};

TokenSupervisor::TokenSupervisor(TokenState& state, HealthState& health, AgentMetrics& metrics,
                                 SupervisorOptions options)
    : state_(state), core_(std::make_shared<Core>(state, health, metrics, options)) {
  // The listener holds the core weakly: a fault reported after the supervisor is gone is
  // simply not acted on.
  state.set_down_listener([weak = std::weak_ptr<Core>(core_)] {
    if (auto core = weak.lock()) core->on_token_down();
  });
  // Each thread holds the core, so a thread left behind by stop() never sees it freed.
  core_->thread_started();
  supervisor_ = std::thread([core = core_] { core->run_supervisor(); });
  core_->thread_started();
  prober_ = std::thread([core = core_] { core->run_prober(); });
}

TokenSupervisor::~TokenSupervisor() {
  if (!stopped_) (void)stop();
}

void TokenSupervisor::set_serving() {
  core_->set_serving();
}

bool TokenSupervisor::stop(std::chrono::milliseconds timeout) noexcept {
  if (stopped_) return stopped_cleanly_;
  stopped_ = true;
  state_.set_down_listener(nullptr);
  core_->request_stop();
  stopped_cleanly_ = core_->wait_exited(timeout);
  if (stopped_cleanly_) {
    supervisor_.join();
    prober_.join();
  } else {
    spdlog::warn(
        "the token supervisor is inside a PKCS#11 call that does not return; "
        "leaving it behind");
    supervisor_.detach();
    prober_.detach();
  }
  return stopped_cleanly_;
}

}  // namespace hsm::agent
