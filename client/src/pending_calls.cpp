#include "pending_calls.hpp"

#include <stdexcept>
#include <utility>

#include "call.hpp"

namespace hsm::client {

std::uint32_t PendingCalls::add(std::shared_ptr<Call> call) {
  // 2^32 calls in flight on one connection cannot happen (memory runs out long before), but
  // the loop below must still terminate.
  if (calls_.size() >= std::size_t{0xFFFFFFFFu}) {
    throw std::length_error("msgids exhausted");
  }
  std::uint32_t msgid = next_msgid_++;  // unsigned: wraps around at 2^32
  while (calls_.contains(msgid)) {
    msgid = next_msgid_++;
  }
  calls_.emplace(msgid, Entry{std::move(call)});
  return msgid;
}

std::shared_ptr<Call> PendingCalls::take(std::uint32_t msgid) {
  auto it = calls_.find(msgid);
  if (it == calls_.end()) {
    return nullptr;
  }
  auto call = std::move(it->second.call);
  calls_.erase(it);
  return call;
}

bool PendingCalls::remove(std::uint32_t msgid, const Call* call) {
  auto it = calls_.find(msgid);
  if (it == calls_.end() || it->second.call.get() != call) {
    return false;
  }
  calls_.erase(it);
  return true;
}

bool PendingCalls::written(std::uint32_t msgid, const Call* call) {
  auto it = calls_.find(msgid);
  if (it == calls_.end() || it->second.call.get() != call) {
    return false;
  }
  it->second.being_written = false;
  return true;
}

std::vector<std::shared_ptr<Call>> PendingCalls::take_all_written() {
  std::vector<std::shared_ptr<Call>> taken;
  taken.reserve(calls_.size());
  for (auto it = calls_.begin(); it != calls_.end();) {
    if (it->second.being_written) {
      ++it;
      continue;
    }
    taken.push_back(std::move(it->second.call));
    it = calls_.erase(it);
  }
  return taken;
}

bool PendingCalls::holds(std::uint32_t msgid, const Call* call) const {
  auto it = calls_.find(msgid);
  return it != calls_.end() && it->second.call.get() == call;
}

}  // namespace hsm::client
