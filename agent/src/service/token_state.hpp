// TokenState: the agent's connection to the token, which can go down and come back without a
// restart (issue 4; docs/reliability.md).
//
// A *generation* is everything that is rebuilt together when the token is re-initialised: the
// initialised library (Module), the login and its anchor session (Token), the session pool and
// the handle cache (KeyStore). The loaded library (dlopen), the token's description and what the
// token can do (AlgorithmSupport, probed once at start) outlive generations.
//
// The token is *up* while a generation is published (acquire() hands it out) and *down* after a
// token-class fault (mark_down): then acquire() returns nullptr at once, so a request answers
// hsm_unavailable without a PKCS#11 call and without waiting for a session.
//
// The rules that make re-initialisation safe while workers run (the contract of this class):
//  1. Whoever calls into the library through a generation holds it (the shared_ptr returned by
//     acquire()) for as long as it may do so: KeyService::execute for the whole request, the
//     probe for the probe. Every PKCS#11 call of the agent goes through a held generation, except
//     those of reinitialise() and close(), which run when no generation is held.
//  2. mark_down() unpublishes the generation and closes its session pool: waiters wake up and
//     answer hsm_unavailable; users already inside the library finish (a dead token answers with
//     errors, quickly) and drop their reference. The generation itself is owned here, not by its
//     users: the last user's reference only records that it is gone, so the teardown (C_Logout,
//     C_CloseSession, C_Finalize) always runs on the supervisor's thread, never on a worker.
//  3. reinitialise() first waits until the retired generation has no user left. Only then is no
//     thread inside the library, which C_Finalize requires (PKCS#11 2.40 section 5.4: C_Finalize
//     while another thread is in a call is undefined behaviour); and only then can no worker
//     still hold a session handle that the re-initialised library may hand out again, to another
//     worker. A call that hangs in the library therefore holds recovery up: the token stays down
//     (not ready, with the reason) until the call returns. It is never finalised under a call.
//  4. The next generation is built in locals and published last; see reinitialise().
//
// Thread-safety: acquire(), is_down(), fault(), mark_down(), generation_number() and probe() are
// safe from any thread. reinitialise() is for one thread (the token supervisor). close() is
// called once, after the supervisor has stopped.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "hsm/protocol/types.hpp"
#include "pkcs11/secret.hpp"
#include "pkcs11/session_pool.hpp"
#include "pkcs11/token.hpp"
#include "service/key_service.hpp"

namespace hsm::agent {

class AgentMetrics;

namespace keys {
class AlgorithmSupport;
class KeyStore;
}  // namespace keys

namespace pkcs11 {
class Library;
class Module;
}  // namespace pkcs11

/// One generation of the connection to the token. Members are destroyed in reverse order:
/// cached handles and sessions before the login, the login before the library (C_Finalize).
struct TokenGeneration {
  TokenGeneration();
  ~TokenGeneration();
  TokenGeneration(const TokenGeneration&) = delete;
  TokenGeneration& operator=(const TokenGeneration&) = delete;

  std::uint64_t number = 0;  // 1 for the generation opened at start, then 2, 3, ...
  std::unique_ptr<pkcs11::Module> module;
  std::unique_ptr<pkcs11::Token> token;
  std::unique_ptr<pkcs11::SessionPool> pool;
  std::unique_ptr<keys::KeyStore> keys;
};

/// Why the token is down.
struct TokenFault {
  std::string reason;              // one line, e.g. "C_Sign failed: CKR_DEVICE_ERROR (0x30)"
  std::optional<std::string> ckr;  // "CKR_DEVICE_ERROR" when a PKCS#11 call failed
  std::chrono::steady_clock::time_point since;
  /// No re-initialisation will be attempted any more: the token refused the PIN when logging in
  /// again (then `reason` and `ckr` name the refusal, no longer the fault that took it down).
  /// Only a restart brings the token back.
  bool until_restart = false;
};

/// What one token probe found.
struct ProbeResult {
  bool ran = false;  // false: the token was down, nothing was called
  bool ok = false;
  std::uint64_t generation = 0;
  std::string error;               // when !ok: one line
  std::optional<std::string> ckr;  // when a PKCS#11 call failed
  std::chrono::steady_clock::duration duration{};
};

/// The outcome of one reinitialise() call.
struct Recovery {
  enum class Result : std::uint8_t {
    kRecovered,    // a new generation is published
    kAlreadyUp,    // nothing to do
    kBusy,         // users of the retired generation are still inside the library
    kFailed,       // an attempt failed; try again later
    kPinRejected,  // the token refused the PIN: never retried
    kClosed,       // close() was called
  };
  Result result = Result::kFailed;
  std::string detail;  // one line: why it failed, or how many users are left
};

class TokenState {
 public:
  /// Loads the library, initialises it, finds the token, logs in, opens the session pool and
  /// probes the token's mechanisms: generation 1. Throws StartupError (PinRejectedError for a
  /// refused PIN); messages never hold the PIN.
  static std::unique_ptr<TokenState> open(HsmConfig config, AgentMetrics& metrics);

  ~TokenState();
  TokenState(const TokenState&) = delete;
  TokenState& operator=(const TokenState&) = delete;

  /// The published generation, held by the caller for as long as it calls into it (rule 1);
  /// nullptr while the token is down. Never blocks on the token.
  [[nodiscard]] std::shared_ptr<TokenGeneration> acquire() const;
  [[nodiscard]] bool is_down() const noexcept { return down_.load(std::memory_order_acquire); }
  /// Why the token is down; nullopt while it is up.
  [[nodiscard]] std::optional<TokenFault> fault() const;
  /// The number of the published generation (0 while down).
  [[nodiscard]] std::uint64_t generation_number() const;

  /// Marks the token down because of a fault seen on generation `generation` (rule 2). Does
  /// nothing (and returns false) when that generation is no longer the published one: a late
  /// fault from a retired generation must not take its successor down. Calls the down listener.
  bool mark_down(std::uint64_t generation, std::string reason, std::optional<std::string> ckr);

  /// Called (outside every lock of this class, on the thread that called mark_down) each time
  /// the token goes down. Set it before the token is used concurrently; nullptr to clear.
  void set_down_listener(std::function<void()> listener);

  /// One attempt to bring the token back (rules 3 and 4): waits up to `drain_wait` for the
  /// retired generation's users to leave, tears it down (C_Logout, C_CloseSession, C_Finalize),
  /// builds the next generation (C_Initialize, find the slot again, log in, open the pool, a
  /// fresh handle cache) and publishes it. Never throws. After kPinRejected it does nothing
  /// more (returns kPinRejected again): a retried PIN can lock the token; fault() then names
  /// the refusal, until_restart.
  [[nodiscard]] Recovery reinitialise(std::chrono::milliseconds drain_wait);

  /// One real call to the token on the published generation: C_GetSessionInfo on the anchor
  /// session (the library, the token and the login all answer), and a check that the session
  /// pool still has a usable session. Makes no change: the caller decides what a failure means.
  [[nodiscard]] ProbeResult probe() const;

  /// Unpublishes and tears down the generation (waiting up to `drain_wait` for its users; if
  /// they stay inside the library, the generation is left alone rather than finalised under
  /// them). Idempotent; never throws.
  void close(std::chrono::milliseconds drain_wait = std::chrono::seconds(5)) noexcept;

  [[nodiscard]] const keys::AlgorithmSupport& support() const noexcept { return *support_; }
  /// The token as found at start (label, manufacturer, model, serial); stable across
  /// generations.
  [[nodiscard]] const protocol::TokenDescription& description() const noexcept {
    return description_;
  }
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }

 private:
  TokenState(HsmConfig config, AgentMetrics& metrics);
  [[nodiscard]] std::unique_ptr<TokenGeneration> build_generation();
  void publish(std::unique_ptr<TokenGeneration> generation);
  /// Waits (lock held) until the retired generation has no user, up to `wait`.
  [[nodiscard]] bool wait_drained(std::unique_lock<std::mutex>& lock,
                                  std::chrono::milliseconds wait);

  AgentMetrics& metrics_;
  const std::shared_ptr<const pkcs11::Library> library_;
  const pkcs11::TokenSelector selector_;
  const SecretString pin_;  // kept only to log in again after a re-initialisation
  const bool read_only_;
  const ObjectChanges object_changes_;
  const pkcs11::SessionPoolOptions pool_options_;
  std::unique_ptr<keys::AlgorithmSupport> support_;  // set by open(), then immutable
  protocol::TokenDescription description_;           // set by open(), then immutable
  std::uint64_t generations_built_ = 0;              // reinitialise()'s thread only

  std::atomic<bool> down_{false};
  mutable std::mutex mutex_;
  std::condition_variable drained_;
  // Owned here (rule 2); touched only by open(), reinitialise() and close(), which never run
  // concurrently, and only while no user holds it or after it was published.
  std::unique_ptr<TokenGeneration> owned_;
  // Users' references to *owned_. Its deleter frees nothing: it sets users_left_ = false.
  std::shared_ptr<TokenGeneration> published_;  // guarded by mutex_; null while down
  bool users_left_ = false;                     // guarded by mutex_
  std::optional<TokenFault> fault_;             // guarded by mutex_
  bool pin_rejected_ = false;                   // guarded by mutex_
  bool closed_ = false;                         // guarded by mutex_
  std::function<void()> down_listener_;         // guarded by mutex_
};

}  // namespace hsm::agent
