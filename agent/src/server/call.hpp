// Call: one request on its way through the agent, shared by the loop thread (which received it
// and owns its deadline) and at most one worker (which runs it). Exactly one of them answers:
// whoever moves `state` to kAnswered first.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"
#include "server/connection_output.hpp"
#include "server/memory_budget.hpp"

namespace hsm::agent {

using SteadyClock = std::chrono::steady_clock;

struct Call {
  enum State : std::uint8_t { kQueued, kRunning, kAnswered };

  std::uint64_t connection_id = 0;
  std::shared_ptr<ConnectionOutput> output;  // where the answer goes
  protocol::Request request;
  Caller caller;
  SteadyClock::time_point received;
  SteadyClock::time_point deadline;
  std::atomic<std::uint8_t> state{kQueued};
  MemoryBudget::Charge charge;  // the request's bytes, until the call is gone

  /// Claims the right to run the call (worker). False when it was answered already (expired).
  bool begin_running() noexcept {
    auto expected = static_cast<std::uint8_t>(kQueued);
    return state.compare_exchange_strong(expected, kRunning, std::memory_order_acq_rel);
  }
  /// Claims the right to answer. False when someone else answered first.
  bool claim_answer() noexcept {
    return state.exchange(kAnswered, std::memory_order_acq_rel) != kAnswered;
  }
};

}  // namespace hsm::agent
