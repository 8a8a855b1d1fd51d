// SessionPool: the PKCS#11 sessions shared by the threads that run requests, sized by demand. A
// thread takes a session with acquire() and gets a Lease; the session goes back to the pool when
// the Lease ends.
//
// Sizing (docs/performance.md, "Session pool"): the pool opens `min_sessions` at start and keeps
// at least that many open. acquire() that finds no idle session opens another one while fewer
// than limit() are open, so the pool grows while requests wait for a session; only at limit()
// does a request wait for a session to come back. limit() is `max_sessions`, lowered to what the
// token allows: its CK_TOKEN_INFO ulMaxSessionCount (less the Token's anchor session) when it
// states one, and the number open when C_OpenSession answers CKR_SESSION_COUNT (logged once).
// A session idle for longer than `idle_timeout` is closed by the pool's reaper thread, down to
// `min_sessions`: by Little's law the sessions a load needs are its rate times the token's time
// per call, so a burst's sessions are not kept once the burst is over.
//
// Opening a session (C_OpenSession, which may block on a slow token) happens outside the pool's
// lock: acquire() reserves the slot under the lock, so other acquire()s and releases go on.
//
// Recovery (docs/reliability.md): a Lease marked broken has its session closed when it ends (and
// replaced at once if the pool would fall below min_sessions); one marked suspect is first
// checked with C_GetSessionInfo. A session that cannot be reopened is a gap that the next
// acquire() fills by opening one (its error then propagates). When the token goes down, close()
// wakes every waiter (they fail with PoolClosedError at once instead of waiting for a session of
// a dead token), the reaper stops, and sessions handed back are no longer checked or replaced:
// the whole pool is torn down with its generation (service/token_state.hpp).
//
// Thread-safety: acquire(), close(), the accessors and Lease destruction are safe from any
// thread. A Lease and its session belong to the thread that acquired it. Every Lease must end
// before the pool does. The reaper thread calls C_CloseSession; the destructor stops and joins
// it before closing the remaining sessions, so the pool must be destroyed before its Module.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <thread>
#include <vector>

#include "pkcs11/session.hpp"
#include "pkcs11/stats.hpp"

namespace hsm::agent::pkcs11 {

class Token;

/// acquire() on a pool that was closed because its token went down.
class PoolClosedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SessionPoolOptions {
  /// Opened at start and kept open when idle (--sessions); at least 1.
  std::size_t min_sessions = 4;
  /// The most the pool opens (--max-sessions); raised to min_sessions if below it.
  std::size_t max_sessions = 64;
  /// An idle session unused for this long is closed, down to min_sessions
  /// (--session-idle-timeout).
  std::chrono::milliseconds idle_timeout{30000};
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
    /// The session is unusable (CKR_SESSION_HANDLE_INVALID, ...): close it.
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

  /// Reads the token's session limit (C_GetTokenInfo), opens options.min_sessions sessions on
  /// `token` and starts the reaper. Throws Pkcs11Error. `token` and `stats` outlive the pool.
  SessionPool(const Token& token, SessionPoolOptions options, Pkcs11Stats& stats);
  /// Stops the reaper, then closes every session (all Leases must have ended).
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  /// An idle session, or a newly opened one while fewer than limit() are open; else waits up to
  /// `timeout` for one to come back; nullopt when none did in time. Throws Pkcs11Error when a
  /// session had to be opened and the token refused (CKR_SESSION_COUNT with sessions open is
  /// not an error: the limit drops and the call waits), and PoolClosedError once close() was
  /// called (also to callers already waiting).
  [[nodiscard]] std::optional<Lease> acquire(std::chrono::milliseconds timeout);

  /// The token is down: wake every waiter, stop the reaper and hand out nothing more. Sessions
  /// handed back afterwards are kept as they are (no C_GetSessionInfo, no replacement) until the
  /// pool is destroyed. Idempotent; makes no PKCS#11 call.
  void close() noexcept;

  /// The most sessions the pool may open now (see the class comment).
  [[nodiscard]] std::size_t limit() const;
  [[nodiscard]] std::size_t idle() const;
  /// Sessions open (idle or leased). 0 means the pool cannot serve anything until a session is
  /// reopened (every session was lost and none could be opened again).
  [[nodiscard]] std::size_t usable_sessions() const;

 private:
  struct IdleSession {
    Session session;
    std::chrono::steady_clock::time_point since;  // when it was handed back
  };

  void release(Session session, Lease::State state) noexcept;
  /// Sessions open or being opened. Lock held.
  [[nodiscard]] std::size_t open_locked() const noexcept { return idle_.size() + busy_ + opening_; }
  /// The token refused another session: the limit becomes what is open. Lock held.
  void lower_limit_locked(std::size_t limit, const char* why);
  /// The reaper thread: closes sessions idle for longer than idle_timeout, down to min_sessions.
  void reap_idle(std::stop_token stop);
  void observe_wait(std::chrono::steady_clock::time_point start) noexcept;
  void update_gauges_locked() noexcept;

  const Token& token_;
  Pkcs11Stats& stats_;
  const SessionPoolOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable idle_available_;
  std::condition_variable_any reaper_wake_;
  // Handed back in time order: the most recently used at the back (acquire() takes it, so that
  // the least recently used drift to the front and time out).
  std::vector<IdleSession> idle_;  // guarded by mutex_
  std::size_t busy_ = 0;           // leased; guarded by mutex_
  std::size_t opening_ = 0;        // slots reserved by a C_OpenSession in progress; mutex_
  std::size_t limit_ = 0;          // guarded by mutex_
  bool limit_logged_ = false;      // guarded by mutex_
  bool closed_ = false;            // guarded by mutex_
  std::jthread reaper_;            // last: started once the rest is built
};

}  // namespace hsm::agent::pkcs11
