#include "server/memory_budget.hpp"

#include <algorithm>
#include <utility>

namespace hsm::agent {

MemoryBudget::Charge::Charge(std::shared_ptr<Meter> meter, std::size_t bytes)
    : meter_(std::move(meter)) {
  resize(bytes);
}

MemoryBudget::Charge::Charge(Charge&& other) noexcept
    : meter_(std::move(other.meter_)), bytes_(std::exchange(other.bytes_, 0)) {}

MemoryBudget::Charge& MemoryBudget::Charge::operator=(Charge&& other) noexcept {
  if (this != &other) {
    resize(0);
    meter_ = std::move(other.meter_);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void MemoryBudget::Charge::resize(std::size_t bytes) noexcept {
  if (!meter_ || bytes == bytes_) return;
  MemoryBudget& budget = meter_->account_->budget_;
  if (bytes > bytes_) {
    budget.add(*meter_, bytes - bytes_);
  } else {
    budget.remove(*meter_, bytes_ - bytes);
  }
  bytes_ = bytes;
}

MemoryBudget::MemoryBudget(std::size_t limit, std::function<void()> on_room)
    : limit_(limit), on_room_(std::move(on_room)) {}

std::shared_ptr<MemoryBudget::Account> MemoryBudget::account(uid_t uid) {
  auto& slot = accounts_[uid];
  if (auto existing = slot.lock()) return existing;
  auto created = std::make_shared<Account>(*this, uid);
  slot = created;
  // Forget uids nobody holds any more, so that many distinct uids cannot grow the table: swept
  // whenever it has doubled since the last sweep (amortised O(1) per account).
  static constexpr std::size_t kSweepFloor = 64;
  if (accounts_.size() >= kSweepFloor && accounts_.size() >= 2 * live_after_sweep_) {
    std::erase_if(accounts_, [](const auto& entry) { return entry.second.expired(); });
    live_after_sweep_ = accounts_.size();
  }
  return created;
}

std::shared_ptr<MemoryBudget::Meter> MemoryBudget::meter(std::shared_ptr<Account> account) {
  return std::make_shared<Meter>(std::move(account));
}

std::size_t MemoryBudget::read_room(const Meter& meter, std::size_t wanted) const noexcept {
  const std::size_t own = meter.bytes();
  const std::size_t light_room = own < kLightConnectionBytes ? kLightConnectionBytes - own : 0;
  std::size_t shared_room = 0;
  const std::size_t used = this->used();
  if (used < limit_) {
    const Account& account = meter.account();
    const std::size_t holding = account.bytes();
    // The asker counts among the uids sharing the budget even when it holds nothing yet.
    const std::size_t sharing = active_uids() + (holding == 0 ? 1 : 0);
    const std::size_t share = limit_ / std::max<std::size_t>(sharing, 1);
    if (holding < share) shared_room = std::min(limit_ - used, share - holding);
  }
  return std::min(wanted, std::max(light_room, shared_room));
}

void MemoryBudget::wait_for_room() noexcept {
  waiting_.store(true, std::memory_order_release);
}

void MemoryBudget::add(Meter& meter, std::size_t bytes) noexcept {
  meter.bytes_.fetch_add(bytes, std::memory_order_relaxed);
  if (meter.account_->bytes_.fetch_add(bytes, std::memory_order_relaxed) == 0) {
    active_accounts_.fetch_add(1, std::memory_order_relaxed);
  }
  const std::size_t now = used_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  std::size_t peak = peak_.load(std::memory_order_relaxed);
  while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void MemoryBudget::remove(Meter& meter, std::size_t bytes) noexcept {
  meter.bytes_.fetch_sub(bytes, std::memory_order_relaxed);
  if (meter.account_->bytes_.fetch_sub(bytes, std::memory_order_relaxed) == bytes) {
    active_accounts_.fetch_sub(1, std::memory_order_relaxed);
  }
  used_.fetch_sub(bytes, std::memory_order_relaxed);
  if (waiting_.load(std::memory_order_relaxed) &&
      waiting_.exchange(false, std::memory_order_acq_rel) && on_room_) {
    on_room_();
  }
}

}  // namespace hsm::agent
