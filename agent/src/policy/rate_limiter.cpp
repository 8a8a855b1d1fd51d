#include "policy/rate_limiter.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace hsm::agent {
namespace {

double checked(double value, const char* flag) {
  if (!std::isfinite(value) || value < 0) {
    throw std::invalid_argument(std::string(flag) + " must be a finite number >= 0");
  }
  return value;
}

double effective_burst(double rate, double burst) {
  if (burst == 0) return std::max(1.0, 2 * rate);
  if (burst < 1) {
    throw std::invalid_argument("--rate-burst must be at least 1 (or 0 for twice the rate)");
  }
  return burst;
}

/// `seconds` as clock ticks, at least one tick and at most a day (beyond, nothing changes
/// in practice and the arithmetic stays far from overflow).
RateLimiter::Clock::duration ticks(double seconds) {
  using Ticks = RateLimiter::Clock::duration;
  const double per_second = static_cast<double>(Ticks::period::den) / Ticks::period::num;
  const double clamped = std::clamp(seconds * per_second, 1.0, 86400.0 * per_second);
  return Ticks(static_cast<Ticks::rep>(std::llround(clamped)));
}

}  // namespace

RateLimiter::RateLimiter(double rate_per_second, double burst, std::size_t max_callers)
    : rate_(checked(rate_per_second, "--rate-limit")),
      burst_(effective_burst(rate_, checked(burst, "--rate-burst"))),
      max_callers_(max_callers) {
  if (max_callers_ == 0) throw std::invalid_argument("the rate limiter needs room for a caller");
  if (!enabled()) return;
  interval_ = ticks(1.0 / rate_);
  tolerance_ = burst_ > 1 ? ticks((burst_ - 1) / rate_) : Clock::duration::zero();
  // An emptied bucket is full again after burst/rate seconds; sweeping a full table more often
  // than that (or than once a second) would mostly find nothing to drop.
  sweep_interval_ = std::min<Clock::duration>(interval_ + tolerance_, std::chrono::seconds(1));
  buckets_.reserve(std::min<std::size_t>(max_callers_, 64));
}

RateLimiter::RateLimiter(const AccessConfig& config)
    : RateLimiter(config.rate_limit_per_second, config.rate_burst) {}

void RateLimiter::evict_full_buckets(Clock::time_point now) {
  std::erase_if(buckets_, [now](const auto& entry) { return entry.second <= now; });
}

bool RateLimiter::try_acquire(uid_t uid, Clock::time_point now, std::size_t tokens) {
  if (!enabled()) return true;
  tokens = std::max<std::size_t>(tokens, 1);
  // More than the burst: no bucket ever holds that many (and the arithmetic below stays small).
  if (static_cast<double>(tokens) > burst_) return false;
  std::lock_guard lock(mutex_);
  auto it = buckets_.find(uid);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_callers_ && now >= next_sweep_) {
      evict_full_buckets(now);
      next_sweep_ = now + sweep_interval_;
    }
    if (buckets_.size() >= max_callers_) return false;  // fail closed; see the header
    it = buckets_.emplace(uid, now).first;              // a new bucket is full
  }
  // GCRA: the bucket holds at least n tokens when its full-again time is no more than
  // (burst - n) tokens' worth ahead of now; taking n moves that time n tokens later.
  Clock::time_point& full_at = it->second;
  const Clock::time_point base = std::max(full_at, now);
  const auto taken = interval_ * static_cast<Clock::rep>(tokens);
  if (base - now + (taken - interval_) > tolerance_) return false;
  full_at = base + taken;
  return true;
}

}  // namespace hsm::agent
