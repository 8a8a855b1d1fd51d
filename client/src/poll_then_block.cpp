#include "poll_then_block.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <thread>

namespace hsm::client {
namespace {

Received classify(ssize_t n) {
  if (n > 0) {
    return {Received::Kind::kData, static_cast<std::size_t>(n), 0};
  }
  if (n == 0) {
    return {Received::Kind::kEnd, 0, 0};
  }
  return {Received::Kind::kFailed, 0, errno};
}

bool would_block(int error) {
  return error == EAGAIN || error == EWOULDBLOCK || error == EINTR;
}

/// A non-blocking recv(): nullopt when nothing is there yet.
std::optional<Received> receive_now(int fd, std::span<char> space) {
  const Received got = classify(::recv(fd, space.data(), space.size(), MSG_DONTWAIT));
  if (got.kind == Received::Kind::kFailed && would_block(got.error)) {
    return std::nullopt;
  }
  return got;
}

}  // namespace

int poll_timeout_ms(Clock::time_point until) noexcept {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now()).count();
  return static_cast<int>(std::clamp<std::chrono::milliseconds::rep>(left, 0, 60'000));
}

Received receive(int fd, std::span<char> space, std::chrono::nanoseconds spin,
                 Clock::time_point until, ReceiveProbe* probe) noexcept {
  if (spin > std::chrono::nanoseconds::zero()) {
    const auto spin_end = Clock::now() + spin;
    do {
      if (probe != nullptr) ++probe->polls;
      if (auto got = receive_now(fd, space)) {
        return *got;
      }
    } while (Clock::now() < spin_end);
  }

  if (probe != nullptr) {
    ++probe->blocks;
    if (probe->before_block) probe->before_block();
  }
  if (until == Clock::time_point::max()) {
    for (;;) {
      const Received got = classify(::recv(fd, space.data(), space.size(), 0));
      if (got.kind != Received::Kind::kFailed || got.error != EINTR) {
        return got;
      }
    }
  }
  for (;;) {
    pollfd descriptor{fd, POLLIN, 0};
    const int ready = ::poll(&descriptor, 1, poll_timeout_ms(until));
    if (ready < 0 && errno != EINTR) {
      return {Received::Kind::kFailed, 0, errno};
    }
    if (ready > 0) {
      // Readable, closed or failed: recv() says which (POLLHUP still lets buffered bytes out).
      if (auto got = receive_now(fd, space)) {
        return *got;
      }
    }
    if (Clock::now() >= until) {
      return {};
    }
  }
}

SpinBudget::SpinBudget(std::chrono::microseconds cap, unsigned max_pollers,
                       Clock::duration pause) noexcept
    : cap_(cap),
      pause_(pause),
      pollers_(std::clamp<std::ptrdiff_t>(
          max_pollers != 0 ? max_pollers : std::thread::hardware_concurrency() / 2, 1,
          kMostPollers)) {}

SpinBudget::Lease::Lease(SpinBudget* owner, std::chrono::nanoseconds spin) noexcept
    : owner_(owner),
      spin_(spin),
      preemptions_before_(owner != nullptr ? common::thread_preemptions() : 0) {}

void SpinBudget::Lease::end_poll() const noexcept {
  if (owner_ != nullptr && common::thread_preemptions() != preemptions_before_) {
    owner_->preempted();  // every core is busy: polling would take one from work
  }
}

SpinBudget::Lease SpinBudget::lease() noexcept {
  if (cap_ == std::chrono::nanoseconds::zero() ||
      share_.load(std::memory_order_relaxed) < kWhole / 2 ||
      Clock::now().time_since_epoch().count() < paused_until_.load(std::memory_order_relaxed) ||
      !pollers_.try_acquire()) {
    return Lease(nullptr, std::chrono::nanoseconds::zero());
  }
  return Lease(this, cap_);
}

void SpinBudget::preempted() noexcept {
  paused_until_.store((Clock::now() + pause_).time_since_epoch().count(),
                      std::memory_order_relaxed);
}

void SpinBudget::record(Clock::duration answer_time) noexcept {
  if (cap_ == std::chrono::nanoseconds::zero()) {
    return;
  }
  const std::int32_t sample = answer_time <= cap_ ? kWhole : 0;
  const std::int32_t share = share_.load(std::memory_order_relaxed);
  share_.store(share + (sample - share) / 8, std::memory_order_relaxed);
}

}  // namespace hsm::client
