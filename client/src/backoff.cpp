#include "backoff.hpp"

#include <algorithm>
#include <random>

namespace hsm::client {

Backoff::Backoff(const RetryPolicy& policy) noexcept
    : initial_(std::max<std::chrono::nanoseconds>(policy.initial_backoff,
                                                  std::chrono::microseconds{100})),
      max_(std::max<std::chrono::nanoseconds>(policy.max_backoff, initial_)) {}

std::chrono::nanoseconds Backoff::ceiling(std::uint32_t attempt) const noexcept {
  // Doubling stops as soon as the cap is reached, so there is no overflow for any attempt.
  auto d = initial_;
  for (std::uint32_t i = 1; i < attempt && d < max_; ++i) {
    d *= 2;
  }
  return std::min(d, max_);
}

std::chrono::nanoseconds Backoff::delay(std::uint32_t attempt) const {
  thread_local std::minstd_rand generator{std::random_device{}()};
  const auto high = ceiling(attempt).count();
  std::uniform_int_distribution<std::chrono::nanoseconds::rep> pick(high / 2, high);
  return std::chrono::nanoseconds{pick(generator)};
}

}  // namespace hsm::client
