#include "service/systemd_notifier.hpp"

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace hsm::agent {

SystemdNotifier::SystemdNotifier(const HealthState& health) : health_(health) {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  enabled_ = socket != nullptr && *socket != '\0';
  if (!enabled_) return;
  std::uint64_t usec = 0;
  // > 0: WatchdogSec is set for this process (WATCHDOG_PID, when present, names it).
  if (const int rc = sd_watchdog_enabled(0, &usec); rc > 0 && usec > 0) {
    watchdog_ = std::chrono::microseconds(usec);
  } else if (rc < 0) {
    spdlog::warn("systemd: ignoring the watchdog settings: {}", std::strerror(-rc));
  }
}

SystemdNotifier::~SystemdNotifier() = default;

void SystemdNotifier::ready(const std::string& socket_path) {
  notify("READY=1\nSTATUS=listening on " + socket_path);
  if (watchdog_ && !watchdog_thread_.joinable()) {
    spdlog::info("systemd: watchdog ping every {} ms", watchdog_->count() / 2000);
    watchdog_thread_ = std::jthread([this](const std::stop_token& stop) { ping_watchdog(stop); });
  }
}

void SystemdNotifier::stopping() {
  // systemd stops watching once the service stops (TimeoutStopSec bounds the drain), and the
  // loop's ticks end before the process does: no pings from here on.
  watchdog_thread_.request_stop();
  notify("STOPPING=1\nSTATUS=draining requests in flight");
}

void SystemdNotifier::notify(const std::string& state) {
  if (!enabled_) return;
  // unset_environment 0: the agent starts no children, and tests read the variable again.
  if (const int rc = sd_notify(0, state.c_str()); rc < 0) {
    spdlog::warn("systemd: cannot notify the service manager ({}): {}",
                 state.substr(0, state.find('\n')), std::strerror(-rc));
  }
}

void SystemdNotifier::ping_watchdog(const std::stop_token& stop) {
  // Half the interval, as sd_watchdog_enabled(3) advises: one late ping is not yet a restart.
  const auto period = *watchdog_ / 2;
  std::unique_lock lock(mutex_);
  while (!stop.stop_requested()) {
    if (health_.loop_alive(HealthState::kMaxLoopSilence)) {
      notify("WATCHDOG=1");
    } else {
      spdlog::warn("systemd: event loop not responding; withholding the watchdog ping");
    }
    wake_.wait_for(lock, stop, period, [] { return false; });
  }
}

}  // namespace hsm::agent
