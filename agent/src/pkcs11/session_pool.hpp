// SessionPool: a fixed number of PKCS#11 sessions shared by the worker threads. A worker takes a
// session with acquire() and gets a Lease; the session goes back to the pool when the Lease ends.
//
// Recovery (docs/reliability.md): a Lease marked broken has its session closed and replaced by a
// fresh one when it ends; one marked suspect is first checked with C_GetSessionInfo. A session
// that cannot be reopened leaves a gap that the next acquire() tries to fill. When the token
// goes down, close() wakes every waiter (they fail with PoolClosedError at once instead of
// waiting for a session of a dead token) and sessions handed back are no longer checked or
// replaced: the whole pool is torn down with its generation (service/token_state.hpp).
//
// Thread-safety: acquire(), close(), usable_sessions() and Lease destruction are safe from any
// thread. A Lease and its session belong to the thread that acquired it. Every Lease must end
// before the pool does.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

#include "pkcs11/session.hpp"

namespace hsm::agent {
class AgentMetrics;
}

namespace hsm::agent::pkcs11 {

class Token;

/// acquire() on a pool that was closed because its token went down.
class PoolClosedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class SessionPool {
 public:
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    /// Returns the session to the pool (or replaces it, see mark_broken / mark_suspect).
    ~Lease();

    [[nodiscard]] Session& session() noexcept { return *session_; }
    /// The session is unusable (CKR_SESSION_HANDLE_INVALID, ...): close and replace it.
    void mark_broken() noexcept { state_ = State::kBroken; }
    /// A call on the session failed: check it with C_GetSessionInfo before reusing it.
    void mark_suspect() noexcept {
      if (state_ == State::kGood) state_ = State::kSuspect;
    }

   private:
    friend class SessionPool;
    enum class State : std::uint8_t { kGood, kSuspect, kBroken };
    Lease(SessionPool& pool, Session session) : pool_(&pool), session_(std::move(session)) {}

    SessionPool* pool_;
    std::optional<Session> session_;
    State state_ = State::kGood;
  };

  /// Opens `size` (>= 1) sessions on `token`. Throws Pkcs11Error.
  SessionPool(const Token& token, std::size_t size, AgentMetrics& metrics);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  /// An idle session, waiting up to `timeout` for one; nullopt when none came free in time.
  /// Throws Pkcs11Error when a session had to be reopened and the token refused, and
  /// PoolClosedError once close() was called (also to callers already waiting).
  [[nodiscard]] std::optional<Lease> acquire(std::chrono::milliseconds timeout);

  /// The token is down: wake every waiter and hand out nothing more. Sessions handed back
  /// afterwards are kept as they are (no C_GetSessionInfo, no replacement) until the pool is
  /// destroyed. Idempotent; makes no PKCS#11 call.
  void close() noexcept;

  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t idle() const;
  /// Sessions open (idle or leased): size() minus those lost and not yet reopened. 0 means the
  /// pool cannot serve anything until a session is reopened.
  [[nodiscard]] std::size_t usable_sessions() const;

 private:
  void release(Session session, Lease::State state) noexcept;
  void update_gauges_locked() noexcept;

  const Token& token_;
  AgentMetrics& metrics_;
  const std::size_t size_;
  mutable std::mutex mutex_;
  std::condition_variable idle_available_;
  std::vector<Session> idle_;  // guarded by mutex_
  std::size_t busy_ = 0;       // guarded by mutex_
  std::size_t missing_ = 0;    // sessions lost and not yet reopened; guarded by mutex_
  bool closed_ = false;        // guarded by mutex_
};

}  // namespace hsm::agent::pkcs11
