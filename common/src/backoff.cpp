#include "hsm/common/backoff.hpp"

#include <algorithm>
#include <random>

namespace hsm::common {

Backoff::Backoff(std::chrono::nanoseconds first, std::chrono::nanoseconds max) noexcept
    : first_(first), max_(std::max(max, first)) {}

std::chrono::nanoseconds Backoff::ceiling(std::uint32_t attempt) const noexcept {
  if (attempt == 0) return std::chrono::nanoseconds{0};
  // Doubling stops as soon as the cap is reached, so there is no overflow for any attempt.
  auto d = first_;
  for (std::uint32_t i = 1; i < attempt && d < max_; ++i) {
    d *= 2;
  }
  return std::min(d, max_);
}

std::chrono::nanoseconds Backoff::delay(std::uint32_t attempt) const {
  const auto high = ceiling(attempt).count();
  if (high == 0) return std::chrono::nanoseconds{0};
  thread_local std::minstd_rand generator{std::random_device{}()};
  std::uniform_int_distribution<std::chrono::nanoseconds::rep> pick(high / 2, high);
  return std::chrono::nanoseconds{pick(generator)};
}

}  // namespace hsm::common
