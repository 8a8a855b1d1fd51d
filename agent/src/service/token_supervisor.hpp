// TokenSupervisor: keeps the token usable without a restart (issues 4 and 5;
// docs/reliability.md). Two background threads:
//
//  - the supervisor thread re-initialises the token whenever it is down (TokenState::
//    reinitialise), with capped exponential backoff and jitter between failed attempts, until it
//    works; it never retries a refused PIN. It also schedules the probe, watches it, and
//    publishes readiness (HealthState) and hsm_agent_hsm_up.
//  - the prober thread makes the probe's real call to the token every probe_interval
//    (TokenState::probe: C_GetSessionInfo on the anchor session) and observes
//    hsm_agent_hsm_probe_duration_seconds. A failed probe marks the token down, which starts a
//    recovery. It is a thread of its own so that a probe which hangs in the library is noticed:
//    after probe_timeout the supervisor marks the token down and not ready (requests then answer
//    hsm_unavailable at once instead of each waiting for its deadline).
//
// Readiness (/readyz): ready only when the server is serving (set_serving), the token is up
// (logged in), the last probe was good and the session pool has a usable session; otherwise
// HealthState::set_not_ready with a one-line reason, e.g. "token down (token probe failed:
// C_GetSessionInfo failed: CKR_DEVICE_ERROR (0x30)); re-initialising".
//
// Thread-safety: set_serving() may be called from any thread; stop() from the owner's thread
// (typically main, after the server stopped; the destructor calls it too). The TokenState,
// HealthState and AgentMetrics must outlive the supervisor, and must not be destroyed at all
// if stop() returned false (a thread was left inside a hung PKCS#11 call; exit the process).
#pragma once

#include <chrono>
#include <memory>
#include <thread>

namespace hsm::agent {

class AgentMetrics;
class HealthState;
class TokenState;

struct SupervisorOptions {
  std::chrono::milliseconds probe_interval{10000};  // --probe-interval
  /// A probe still running after this marks the token down (the token hangs).
  std::chrono::milliseconds probe_timeout{5000};
  /// Backoff between failed re-initialisation attempts (hsm/common/backoff.hpp).
  std::chrono::milliseconds first_backoff{100};
  std::chrono::milliseconds max_backoff{5000};
  /// A token that stayed up this long after a recovery counts as healthy again: the next fault
  /// starts the backoff over (an immediate first attempt). Faults closer together keep backing
  /// off, so a token that fails right after every re-initialisation is not hammered.
  std::chrono::milliseconds stable_after{10000};
  /// How long one attempt waits for requests still inside the failed token before trying again
  /// (and checking for stop()).
  std::chrono::milliseconds drain_wait{1000};
};

class TokenSupervisor {
 public:
  /// Starts both threads. The first probe runs after one probe_interval.
  TokenSupervisor(TokenState& state, HealthState& health, AgentMetrics& metrics,
                  SupervisorOptions options = {});
  /// stop() with its default timeout, unless already stopped.
  ~TokenSupervisor();
  TokenSupervisor(const TokenSupervisor&) = delete;
  TokenSupervisor& operator=(const TokenSupervisor&) = delete;

  /// The server accepts requests: readiness may turn true from now on (until then /readyz says
  /// "starting").
  void set_serving();

  /// Stops both threads and waits up to `timeout` for them. False when one is stuck inside a
  /// PKCS#11 call: it is detached (see the class comment). Idempotent.
  [[nodiscard]] bool stop(std::chrono::milliseconds timeout = std::chrono::seconds(2)) noexcept;

 private:
  class Core;  // what the threads share; kept alive by them if they are left behind
  TokenState& state_;
  std::shared_ptr<Core> core_;
  std::thread supervisor_;
  std::thread prober_;
  bool stopped_ = false;
  bool stopped_cleanly_ = false;
};

}  // namespace hsm::agent
