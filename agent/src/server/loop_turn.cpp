#include "server/loop_turn.hpp"

#include <algorithm>
#include <utility>

namespace hsm::agent {
namespace {

std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

LoopTurn::LoopTurn(Timing timing, std::function<void()> hand_over)
    : timing_(timing), hand_over_(std::move(hand_over)), watchdog_([this] { watch(); }) {}

LoopTurn::~LoopTurn() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  watchdog_.join();
}

bool LoopTurn::try_take() noexcept {
  bool expected = false;
  return held_.compare_exchange_strong(expected, true, std::memory_order_acq_rel);
}

void LoopTurn::release() noexcept {
  held_.store(false, std::memory_order_release);
}

std::int64_t LoopTurn::release_for_inline_call() noexcept {
  // The start time is the ticket: unique, as only the turn's holder gets here.
  const auto ticket = std::max(now_ns(), last_ticket_.load(std::memory_order_relaxed) + 1);
  last_ticket_.store(ticket, std::memory_order_relaxed);
  inline_since_ns_.store(ticket);  // seq_cst, paired with watch(): see there
  release();
  if (asleep_.load()) {
    {
      std::lock_guard lock(mutex_);
      asleep_.store(false);
    }
    wake_.notify_one();
  }
  return ticket;
}

void LoopTurn::inline_call_done(std::int64_t ticket) noexcept {
  inline_since_ns_.compare_exchange_strong(ticket, 0);
}

void LoopTurn::watch() {
  const auto overstay_ns = std::chrono::nanoseconds(timing_.overstay).count();
  const auto idle_after_ns = std::chrono::nanoseconds(timing_.idle_after).count();
  std::int64_t handed_over_ticket = 0;  // the inline call handed over already
  std::int64_t last_seen_ticket = 0;
  std::int64_t last_active_ns = now_ns();

  std::unique_lock lock(mutex_);
  while (!stopping_) {
    const auto now = now_ns();
    const auto since = inline_since_ns_.load();
    const auto ticket = last_ticket_.load(std::memory_order_relaxed);
    if (since != 0 || ticket != last_seen_ticket) {  // an inline call runs, or ran since
      last_active_ns = now;
      last_seen_ticket = ticket;
    }
    if (since != 0 && now - since >= overstay_ns && since != handed_over_ticket && !held()) {
      handed_over_ticket = since;
      hand_overs_.fetch_add(1);
      lock.unlock();
      hand_over_();
      lock.lock();
      continue;
    }
    if (since == 0 && now - last_active_ns >= idle_after_ns) {
      // Nothing runs inline, nor did for a while: stop ticking. Dekker-style with
      // release_for_inline_call() (both seq_cst): either it sees asleep_ and wakes us, or we
      // see its inline_since_ns_ here and do not sleep.
      asleep_.store(true);
      if (inline_since_ns_.load() != 0) {
        asleep_.store(false);
        continue;
      }
      wake_.wait(lock, [this] { return !asleep_.load() || stopping_; });
      asleep_.store(false);
      last_active_ns = now_ns();
      continue;
    }
    wake_.wait_for(lock, timing_.tick, [this] { return stopping_; });
  }
}

}  // namespace hsm::agent
