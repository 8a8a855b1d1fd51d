// HealthState: what /healthz and /readyz answer. Written by the loop thread (heartbeat), the
// token probe / recovery code and the audit log's writer (readiness); read by the HTTP threads.
// Thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>

namespace hsm::agent {

class HealthState {
 public:
  using Clock = std::chrono::steady_clock;

  /// The loop ticks every second; three missed ticks mean it is stuck (/healthz, and the
  /// systemd watchdog).
  static constexpr std::chrono::milliseconds kMaxLoopSilence{3000};

  HealthState() : last_heartbeat_ns_(now_ns()) {}

  /// Called by a timer on the event loop: proves the loop is turning.
  void heartbeat() noexcept { last_heartbeat_ns_.store(now_ns(), std::memory_order_relaxed); }
  /// Liveness: the loop ticked within `max_silence`.
  [[nodiscard]] bool loop_alive(std::chrono::milliseconds max_silence) const noexcept {
    const auto silence = now_ns() - last_heartbeat_ns_.load(std::memory_order_relaxed);
    return silence <= std::chrono::duration_cast<std::chrono::nanoseconds>(max_silence).count();
  }

  /// Readiness: nullopt when ready, else a one-line reason ("token probe failed: CKR_...").
  void set_ready() {
    std::lock_guard lock(mutex_);
    not_ready_reason_.reset();
  }
  void set_not_ready(std::string reason) {
    std::lock_guard lock(mutex_);
    not_ready_reason_ = std::move(reason);
  }
  /// The listening socket's path no longer leads to the agent (deleted, renamed or replaced:
  /// clients cannot connect): not ready with this reason, whatever the token says, until cleared
  /// with nullopt. Set by the event loop.
  void set_socket_problem(std::optional<std::string> problem) {
    std::lock_guard lock(mutex_);
    socket_problem_ = std::move(problem);
  }
  [[nodiscard]] std::optional<std::string> not_ready_reason() const {
    if (draining_.load(std::memory_order_acquire)) return std::string("draining");
    std::lock_guard lock(mutex_);
    if (socket_problem_) return socket_problem_;
    if (not_ready_reason_) return not_ready_reason_;
    if (audit_problem_ && audit_refuses_) return audit_problem_;
    return std::nullopt;
  }

  /// The audit log cannot be written: `problem` says why (nullopt: it can again). When
  /// `refuses_key_operations` (the agent fails closed) the agent is not ready, with `problem` as
  /// the reason; else (--audit-fail-open) it stays ready and readiness_note() carries it.
  void set_audit_problem(std::optional<std::string> problem, bool refuses_key_operations) {
    std::lock_guard lock(mutex_);
    audit_problem_ = std::move(problem);
    audit_refuses_ = refuses_key_operations;
  }
  /// For a ready agent: a problem that does not stop it from serving, shown by /readyz.
  [[nodiscard]] std::optional<std::string> readiness_note() const {
    std::lock_guard lock(mutex_);
    if (audit_problem_ && !audit_refuses_) return audit_problem_;
    return std::nullopt;
  }
  /// Shutdown began (SIGTERM): not ready from now on, whatever the token probe says, so that
  /// Kubernetes stops routing to the pod while in-flight requests drain. One way.
  void set_draining() noexcept { draining_.store(true, std::memory_order_release); }

 private:
  static long long now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
        .count();
  }
  std::atomic<long long> last_heartbeat_ns_;
  std::atomic<bool> draining_{false};
  mutable std::mutex mutex_;
  std::optional<std::string> not_ready_reason_{"starting"};
  std::optional<std::string> socket_problem_;
  std::optional<std::string> audit_problem_;
  bool audit_refuses_ = false;
};

}  // namespace hsm::agent
