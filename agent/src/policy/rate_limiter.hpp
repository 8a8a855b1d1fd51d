// RateLimiter: a token bucket per caller uid (--rate-limit RPS, --rate-burst N), so one noisy
// container cannot starve its neighbours: each uid has its own bucket of `burst` tokens that
// refills at `rate` tokens per second, and a signature takes one token: a request takes one per
// signature it asks for (a sign_batch one per item), all of them or none (the server answers
// `overloaded`). Off when the rate is 0 (the default).
//
// Memory is bounded: at most `max_callers` buckets. A bucket that has refilled to full is
// indistinguishable from a new one, so it is dropped when room is needed (never changing any
// decision). Only when every tracked bucket is still refilling is a NEW uid refused, until one
// fills up (at most burst/rate seconds): the limiter fails closed rather than forget a noisy
// caller's debt.
//
// Implemented as GCRA, the token bucket's exact integer form: per uid only the time at which its
// bucket will be full again, in clock ticks, so refills have no rounding drift. Time is passed
// in (`now`), so tests drive it without sleeping; callers pass a monotonic clock's reading. A
// `now` older than an earlier one mints no tokens.
// Thread-safety: every member is safe from any thread (the agent's worker loops share one
// limiter: a uid's budget is the same whichever worker its connections landed on). Off, it takes
// no lock. Allocates only when it starts tracking a new uid.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <mutex>
#include <unordered_map>

#include "config/agent_config.hpp"

namespace hsm::agent {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::size_t kDefaultMaxCallers = 1024;

  /// `rate_per_second` 0: off (try_acquire always succeeds). `burst` 0: twice the rate, at least
  /// 1. Throws std::invalid_argument (naming --rate-limit / --rate-burst) for a negative or
  /// non-finite value, an explicit burst below 1 (no request could ever pass), or max_callers 0.
  RateLimiter(double rate_per_second, double burst, std::size_t max_callers = kDefaultMaxCallers);
  /// From --rate-limit and --rate-burst.
  explicit RateLimiter(const AccessConfig& config);

  /// Takes `tokens` tokens (at least 1) from `uid`'s bucket, all or none: true when the request
  /// may proceed, false when the bucket cannot cover them now (answer `overloaded`). A request
  /// for more than the burst can never pass.
  [[nodiscard]] bool try_acquire(uid_t uid, Clock::time_point now, std::size_t tokens = 1);

  [[nodiscard]] bool enabled() const noexcept { return rate_ > 0; }
  [[nodiscard]] double rate() const noexcept { return rate_; }
  [[nodiscard]] double burst() const noexcept { return burst_; }
  /// How many uids have a bucket now (at most max_callers).
  [[nodiscard]] std::size_t tracked_callers() const {
    std::lock_guard lock(mutex_);
    return buckets_.size();
  }

 private:
  /// Drops every bucket that is full at `now`.
  void evict_full_buckets(Clock::time_point now);

  double rate_;
  double burst_;
  std::size_t max_callers_;
  Clock::duration interval_{};        // one token's worth of time: 1/rate
  Clock::duration tolerance_{};       // (burst - 1) tokens' worth: how far ahead a bucket may run
  Clock::duration sweep_interval_{};  // how often a full table may be swept for full buckets
  mutable std::mutex mutex_;          // guards what follows
  Clock::time_point next_sweep_ = Clock::time_point::min();
  /// uid -> when its bucket is full again (at or before now: full).
  std::unordered_map<uid_t, Clock::time_point> buckets_;
};

}  // namespace hsm::agent
