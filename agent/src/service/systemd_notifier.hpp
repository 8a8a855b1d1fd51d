// SystemdNotifier: tells the service manager (systemd, or anything that speaks its notify
// protocol on $NOTIFY_SOCKET) how the agent is doing, through libsystemd's sd_notify(3):
//
//  - READY=1 once the socket accepts connections (Type=notify: units ordered after the agent
//    start only then);
//  - STOPPING=1 when SIGTERM/SIGINT starts the drain;
//  - WATCHDOG=1 every half WatchdogSec while the event loop turns (the same liveness rule as
//    /healthz: a tick within HealthState::kMaxLoopSilence), when the unit sets WatchdogSec
//    (sd_watchdog_enabled(3)). A stuck loop stops the pings, and systemd restarts the agent.
//
// Without $NOTIFY_SOCKET (a container, a shell) every call does nothing and no thread starts.
// Thread-safety: ready() and stopping() may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "metrics/health_state.hpp"

namespace hsm::agent {

class SystemdNotifier {
 public:
  /// Reads $NOTIFY_SOCKET and $WATCHDOG_USEC. `health` must outlive this object. Never throws
  /// for the service manager's sake: a failure to notify is logged, and the agent goes on.
  explicit SystemdNotifier(const HealthState& health);
  /// Stops the watchdog thread.
  ~SystemdNotifier();
  SystemdNotifier(const SystemdNotifier&) = delete;
  SystemdNotifier& operator=(const SystemdNotifier&) = delete;

  /// READY=1, with a STATUS line naming the socket. Starts the watchdog pings, if enabled.
  void ready(const std::string& socket_path);
  /// STOPPING=1: the drain began. The watchdog pings end (systemd does not watch a stopping
  /// service; TimeoutStopSec bounds the drain).
  void stopping();

  /// The watchdog interval asked for by the service manager, if any.
  [[nodiscard]] std::optional<std::chrono::microseconds> watchdog_interval() const noexcept {
    return watchdog_;
  }

 private:
  void notify(const std::string& state);
  void ping_watchdog(const std::stop_token& stop);

  const HealthState& health_;
  bool enabled_ = false;  // $NOTIFY_SOCKET is set
  std::optional<std::chrono::microseconds> watchdog_;
  std::mutex mutex_;
  std::condition_variable_any wake_;
  std::jthread watchdog_thread_;  // last: stopped and joined first
};

}  // namespace hsm::agent
