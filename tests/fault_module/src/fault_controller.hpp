// The live fault rules of one module instance: the control file (HSM_FAULT_CONTROL) is watched
// and re-parsed when it changes, and every PKCS#11 call asks which fault, if any, applies to it.
#pragma once

#include <p11-kit/pkcs11.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "control_rules.hpp"
#include "function_table.hpp"

namespace hsm::fault {

/// Mutable state of one rule. It outlives a re-read of the control file when the rule's line is
/// unchanged, which is what keeps `count=N` from restarting when the file is rewritten.
struct RuleState {
  explicit RuleState(std::optional<std::uint64_t> count) noexcept : remaining(count.value_or(0)) {}
  std::atomic<std::uint64_t> remaining;  ///< faults left, when the rule has a count
  /// For `session=first`: the session the rule was bound to by its first matching call.
  std::atomic<CK_SESSION_HANDLE> bound_session{CK_INVALID_HANDLE};
  /// Set once the rule's line has left the control file; hung calls watch it.
  std::atomic<bool> retired{false};
};

/// The fault chosen for one call.
struct Fault {
  std::optional<CK_RV> rv;  ///< returned instead of the real result
  std::chrono::microseconds delay{0};
  std::shared_ptr<const RuleState> hang;  ///< non-null: block until this rule is retired
  std::uint64_t finalize_epoch = 0;       ///< release_hung_calls() count when chosen
};

/// Thread-safe: every method may be called from any thread at any time.
class FaultController {
 public:
  /// `control_path` empty: no rules ever (pure forwarding). `poll_interval`: the least time
  /// between two stat() calls on the control file from poll(); zero means every call.
  FaultController(std::string control_path, std::chrono::microseconds poll_interval);
  FaultController(const FaultController&) = delete;
  FaultController& operator=(const FaultController&) = delete;
  FaultController(FaultController&&) = delete;
  FaultController& operator=(FaultController&&) = delete;
  ~FaultController() = default;

  /// Re-reads the control file if it changed and the poll interval has passed. Cheap when it has
  /// not: a clock read and an atomic compare. With a poll interval it never blocks on another
  /// thread's re-read; with none (0), it waits for one under way and checks again, so that a
  /// change made before the call is in force for it, however many threads are calling.
  void poll() noexcept;

  /// Whether any rule is in force. The fast path: when false, calls skip take_fault().
  [[nodiscard]] bool armed() const noexcept { return armed_.load(std::memory_order_acquire); }

  /// The first rule in file order that matches the call and has faults left, consuming one of
  /// its count (binding it first if it is `session=first`); nullopt if none.
  [[nodiscard]] std::optional<Fault> take_fault(FunctionId function,
                                                std::optional<CK_SESSION_HANDLE> session) noexcept;

  enum class HangEnd { kCleared, kFinalized };
  /// Blocks while `fault` hangs: until its rule leaves the control file (the file is re-checked
  /// every few milliseconds) or release_hung_calls() is called.
  [[nodiscard]] HangEnd wait_while_hung(const Fault& fault) noexcept;

  /// Ends every current hang with HangEnd::kFinalized (called by C_Finalize).
  void release_hung_calls() noexcept;

 private:
  /// What stat() says about the control file; any difference means "re-read it".
  struct FileIdentity {
    bool exists = false;
    dev_t device = 0;
    ino_t inode = 0;
    off_t size = 0;
    std::int64_t mtime_ns = 0;
    std::int64_t ctime_ns = 0;
    bool operator==(const FileIdentity&) const = default;
  };
  struct ActiveRule {
    RuleSpec spec;
    std::string key;  ///< identity plus its occurrence number in the file
    std::shared_ptr<RuleState> state;
  };
  using RuleSet = std::vector<ActiveRule>;

  /// Re-reads and re-parses the control file if its identity changed. The caller holds
  /// reload_mutex_ (passed in to make that visible).
  void reload_if_changed(const std::unique_lock<std::mutex>& held) noexcept;
  void install(const std::string& text);
  [[nodiscard]] std::shared_ptr<const RuleSet> snapshot() const;
  [[nodiscard]] static bool session_matches(const ActiveRule& rule,
                                            std::optional<CK_SESSION_HANDLE> session) noexcept;
  [[nodiscard]] static bool consume(const ActiveRule& rule) noexcept;

  const std::string control_path_;
  const std::int64_t poll_interval_ns_;
  std::atomic<std::int64_t> next_poll_ns_{0};
  std::atomic<bool> armed_{false};
  std::atomic<std::uint64_t> finalize_epoch_{0};

  std::mutex reload_mutex_;  // serialises re-reads; guards file_
  FileIdentity file_;

  mutable std::mutex rules_mutex_;  // guards the rules_ pointer (not the set, which is immutable)
  std::shared_ptr<const RuleSet> rules_;
};

}  // namespace hsm::fault
