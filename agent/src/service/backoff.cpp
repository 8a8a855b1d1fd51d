#include "service/backoff.hpp"

#include <algorithm>

namespace hsm::agent {

Backoff::Backoff(std::chrono::milliseconds first, std::chrono::milliseconds max, std::uint64_t seed)
    : first_(std::max(first, std::chrono::milliseconds{1})),
      max_(std::max(max, first_)),
      random_(seed) {}

std::chrono::milliseconds Backoff::ceiling(unsigned n) const noexcept {
  if (n == 0) return std::chrono::milliseconds{0};
  // Doubling stops at the cap, so the shift never overflows.
  std::chrono::milliseconds delay = first_;
  for (unsigned i = 1; i < n && delay < max_; ++i) delay *= 2;
  return std::min(delay, max_);
}

std::chrono::milliseconds Backoff::next() {
  const std::chrono::milliseconds upper = ceiling(attempts_);
  if (attempts_ < ~0U) ++attempts_;
  if (upper.count() == 0) return upper;
  std::uniform_int_distribution<std::chrono::milliseconds::rep> pick(upper.count() / 2,
                                                                     upper.count());
  return std::chrono::milliseconds{pick(random_)};
}

}  // namespace hsm::agent
