// DeadlineQueue: the calls in flight, earliest deadline first, for the loop's deadline timer.
//
// Nearly every call is answered long before its deadline, and a heap cannot remove an entry
// from its middle, so answered calls leave their entries behind. An entry holds a weak pointer,
// and a weak pointer keeps the call's memory (one make_shared block) allocated until the entry
// goes: left alone, the queue would hold requests per second x the request timeout of them
// (50,000 at 10,000/s and 5 s; tens of MiB, and a heap fragmented by them). push() therefore
// drops every answered entry at once whenever the queue has doubled since the last time (and
// holds at least kCompactFloor): amortised O(1) per call, and the queue stays proportional to
// the calls in flight.
//
// "Answered" is "nobody holds the call any more": a queued call is held by the worker queue, a
// running one by its worker, so neither is dropped.
//
// Thread-safety: none (the loop's).
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <vector>

#include "server/call.hpp"

namespace hsm::agent {

class DeadlineQueue {
 public:
  struct Entry {
    SteadyClock::time_point deadline;
    std::weak_ptr<Call> call;
  };
  static constexpr std::size_t kCompactFloor = 1024;

  void push(SteadyClock::time_point deadline, std::weak_ptr<Call> call) {
    if (heap_.size() >= compact_at_) drop_answered();
    heap_.push_back({deadline, std::move(call)});
    std::push_heap(heap_.begin(), heap_.end(), LaterFirst{});
  }
  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }
  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  /// The earliest deadline; the queue must not be empty.
  [[nodiscard]] const Entry& top() const { return heap_.front(); }
  /// Removes and returns the earliest entry; the queue must not be empty.
  Entry pop() {
    std::pop_heap(heap_.begin(), heap_.end(), LaterFirst{});
    Entry entry = std::move(heap_.back());
    heap_.pop_back();
    return entry;
  }
  /// Drops the entries of answered calls now (push() does it when the queue has doubled).
  void drop_answered() {
    std::erase_if(heap_, [](const Entry& entry) { return entry.call.expired(); });
    std::make_heap(heap_.begin(), heap_.end(), LaterFirst{});
    compact_at_ = std::max(kCompactFloor, 2 * heap_.size());
  }

 private:
  struct LaterFirst {
    bool operator()(const Entry& a, const Entry& b) const { return a.deadline > b.deadline; }
  };

  std::vector<Entry> heap_;
  std::size_t compact_at_ = kCompactFloor;
};

}  // namespace hsm::agent
