// A fixed number of connection slots, each opened on demand and reopened after a failure with
// capped exponential backoff and jitter.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <variant>
#include <vector>

#include "backoff.hpp"
#include "connection.hpp"

namespace hsm::client {

/// Thread-safe. Owns the reader threads of its connections and joins them in close().
class ConnectionPool {
 public:
  /// No connection is opened here: each slot connects the first time it is picked. Every
  /// connection reports the end of its attempts to `attempt_ended`, on its reader thread.
  ConnectionPool(ConnectionSettings settings, std::size_t size, const RetryPolicy& policy,
                 AttemptEnded attempt_ended);
  ~ConnectionPool();
  ConnectionPool(const ConnectionPool&) = delete;
  ConnectionPool& operator=(const ConnectionPool&) = delete;
  ConnectionPool(ConnectionPool&&) = delete;
  ConnectionPool& operator=(ConnectionPool&&) = delete;

  /// No usable connection now: why, and when a slot may be tried again.
  struct Unavailable {
    Error error;
    Clock::time_point retry_at;
  };

  /// A usable connection: the next slot in round-robin order, (re)connected if it is down and
  /// its backoff has passed; otherwise any other usable slot. Never blocks (connecting a Unix
  /// socket does not wait).
  [[nodiscard]] std::variant<std::shared_ptr<Connection>, Unavailable> acquire();

  /// Closes every connection and joins their reader threads (so the pending calls have been
  /// failed when it returns). acquire() fails afterwards. Must not run on a reader thread.
  void close() noexcept;

  /// Calls waiting for an answer on the pool's current connections (for tests).
  [[nodiscard]] std::size_t pending_calls();

 private:
  struct Slot {
    std::mutex mutex;
    std::shared_ptr<Connection> connection;
    std::uint32_t failures = 0;        // consecutive failed connects
    Clock::time_point next_attempt{};  // no connect before this
    std::optional<Error> last_error;
  };
  struct Reader {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  std::shared_ptr<Connection> usable_connection(Slot& slot);
  /// Tries to (re)connect `slot` if its backoff allows. The slot's mutex must be held.
  std::shared_ptr<Connection> connect_locked(Slot& slot, Clock::time_point now);
  void start_reader(const std::shared_ptr<Connection>& connection);

  const ConnectionSettings settings_;
  const Backoff backoff_;
  const AttemptEnded attempt_ended_;
  std::vector<Slot> slots_;
  std::atomic<std::size_t> next_slot_{0};

  std::mutex readers_mutex_;
  bool closed_ = false;          // guarded by readers_mutex_
  std::vector<Reader> readers_;  // guarded by readers_mutex_
};

}  // namespace hsm::client
