#include "connection_pool.hpp"

#include <algorithm>
#include <string>
#include <utility>

namespace hsm::client {

ConnectionPool::ConnectionPool(ConnectionSettings settings, std::size_t size,
                               const RetryPolicy& policy, AttemptEnded attempt_ended)
    : settings_(std::move(settings)),
      backoff_(policy),
      attempt_ended_(std::move(attempt_ended)),
      slots_(std::max<std::size_t>(size, 1)) {}

ConnectionPool::~ConnectionPool() {
  close();
}

std::shared_ptr<Connection> ConnectionPool::usable_connection(Slot& slot) {
  std::lock_guard lock(slot.mutex);
  if (slot.connection && slot.connection->usable()) {
    return slot.connection;
  }
  return nullptr;
}

std::variant<std::shared_ptr<Connection>, ConnectionPool::Unavailable> ConnectionPool::acquire() {
  const std::size_t count = slots_.size();
  const std::size_t first = next_slot_.fetch_add(1, std::memory_order_relaxed) % count;
  const auto now = Clock::now();
  {
    // The round-robin slot first, connecting it when it is new or down: this spreads calls
    // over the pool and opens each slot lazily.
    Slot& slot = slots_[first];
    std::lock_guard lock(slot.mutex);
    if (slot.connection && slot.connection->usable()) {
      return slot.connection;
    }
    if (auto connection = connect_locked(slot, now)) {
      return connection;
    }
  }
  // That slot is down and cannot be reopened yet: any other working slot will do.
  for (std::size_t i = 1; i < count; ++i) {
    if (auto connection = usable_connection(slots_[(first + i) % count])) {
      return connection;
    }
  }
  for (std::size_t i = 1; i < count; ++i) {
    Slot& slot = slots_[(first + i) % count];
    std::lock_guard lock(slot.mutex);
    if (auto connection = connect_locked(slot, now)) {
      return connection;
    }
  }

  Unavailable unavailable{
      Error(Errc::kConnectionFailed, "cannot connect to " + settings_.socket_path),
      Clock::time_point::max()};
  for (std::size_t i = 0; i < count; ++i) {
    Slot& slot = slots_[(first + i) % count];
    std::lock_guard lock(slot.mutex);
    unavailable.retry_at = std::min(unavailable.retry_at, slot.next_attempt);
    if (i == 0 && slot.last_error) {
      unavailable.error = *slot.last_error;
    }
  }
  return unavailable;
}

std::shared_ptr<Connection> ConnectionPool::connect_locked(Slot& slot, Clock::time_point now) {
  // Backoff only follows failed connects: the first reconnect after a lost connection is
  // immediate (the agent may be back already), the following ones wait longer and longer.
  if (now < slot.next_attempt) {
    return nullptr;
  }
  try {
    auto connection = std::make_shared<Connection>(connect_unix_socket(settings_.socket_path),
                                                   settings_, attempt_ended_);
    start_reader(connection);
    // The connection replaced here (if any) is dead; its reader thread still holds it until it
    // has failed its calls, and is joined later.
    slot.connection = std::move(connection);
    slot.failures = 0;
    slot.next_attempt = {};
    slot.last_error.reset();
    return slot.connection;
  } catch (const Error& error) {
    slot.last_error = error;
  } catch (const std::exception& error) {  // std::thread could not start, out of memory
    slot.last_error =
        Error(Errc::kConnectionFailed,
              "cannot open a connection to " + settings_.socket_path + ": " + error.what());
  }
  ++slot.failures;
  slot.next_attempt = now + backoff_.delay(slot.failures);
  return nullptr;
}

void ConnectionPool::start_reader(const std::shared_ptr<Connection>& connection) {
  std::lock_guard lock(readers_mutex_);
  if (closed_) {
    connection->close();
    throw Error(Errc::kConnectionFailed, "the client is closed");
  }
  // Join the readers of connections that died before (they have finished or are finishing).
  std::erase_if(readers_, [](Reader& reader) {
    if (!reader.done->load(std::memory_order_acquire)) {
      return false;
    }
    reader.thread.join();
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  // The thread owns a reference to its connection, so the connection outlives read_loop().
  std::thread thread([connection, done] {
    connection->read_loop();
    done->store(true, std::memory_order_release);
  });
  readers_.push_back(Reader{std::move(thread), std::move(done)});
}

std::size_t ConnectionPool::pending_calls() {
  std::size_t pending = 0;
  for (Slot& slot : slots_) {
    std::lock_guard lock(slot.mutex);
    if (slot.connection) {
      pending += slot.connection->pending_calls();
    }
  }
  return pending;
}

void ConnectionPool::close() noexcept {
  std::vector<Reader> readers;
  {
    std::lock_guard lock(readers_mutex_);
    closed_ = true;
    readers.swap(readers_);
  }
  for (Slot& slot : slots_) {
    std::lock_guard lock(slot.mutex);
    if (slot.connection) {
      slot.connection->close();
    }
    slot.connection.reset();
  }
  for (Reader& reader : readers) {
    if (reader.thread.get_id() == std::this_thread::get_id()) {
      reader.thread.detach();  // documented misuse (closing from a callback); do not deadlock
    } else if (reader.thread.joinable()) {
      reader.thread.join();
    }
  }
}

}  // namespace hsm::client
