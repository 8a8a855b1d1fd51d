// MemoryBudget: one bound (--max-buffered-bytes) on the bytes the agent holds for its callers:
// incomplete messages in read buffers, decoded requests waiting for or inside a worker, and
// answers not yet written. Without it memory grew with connections x message size: 250
// connections each holding an incomplete 1 MiB message took the agent past its pod's memory
// limit (issue 15).
//
// Bytes are charged three ways at once: to the connection that holds them (a Meter), to the
// caller's uid (an Account) and to the whole agent. Charges are RAII (Charge): a charge ends
// when what it stands for is freed, on whichever thread that happens.
//
// The rule, applied before every read (read_room()):
// - A light connection always reads: one holding less than kLightConnectionBytes in all (any
//   ordinary request fits) may read up to that much, whatever others hold. So no flood of heavy
//   connections can stop an app's small requests.
// - Beyond that a connection reads only while the agent holds less than the limit and its uid
//   holds less than its fair share: the limit divided by the uids that hold bytes now (counting
//   the asker). A lone app may use the whole budget; when a second uid needs room, the first
//   stops growing until it is under its share again. Connections that find no room stop reading
//   (the heaviest ones: the light ones always have room) and wait until bytes are released; an
//   incomplete message that waits longer than --read-timeout closes its connection (server.cpp).
// The worst case is therefore bounded: limit + connections x kLightConnectionBytes, plus one
// read chunk per connection and the answers of requests already admitted (docs/reliability.md
// states the whole formula and the measurements).
//
// Thread-safety: account() and read_room() on the loop thread; charges, releases and the
// getters from any thread (atomics). `on_room` is called on the thread that released bytes
// after a reader found no room (once per wait_for_room()); it must be thread-safe and cheap
// (uv_async_send).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <unordered_map>

namespace hsm::agent {

class MemoryBudget {
 public:
  /// What a connection may hold without asking the shared budget. An ordinary request (a digest
  /// or a JWT's signing input) is far smaller.
  static constexpr std::size_t kLightConnectionBytes = 16 * 1024;

  /// One uid's bytes, shared by its connections and calls.
  class Account {
   public:
    Account(MemoryBudget& budget, uid_t uid) noexcept : budget_(budget), uid_(uid) {}
    Account(const Account&) = delete;
    Account& operator=(const Account&) = delete;
    [[nodiscard]] uid_t uid() const noexcept { return uid_; }
    [[nodiscard]] std::size_t bytes() const noexcept {
      return bytes_.load(std::memory_order_relaxed);
    }

   private:
    friend class MemoryBudget;
    MemoryBudget& budget_;
    const uid_t uid_;
    std::atomic<std::size_t> bytes_{0};
  };

  /// One connection's bytes (read buffer, its calls, its unsent answers), charged to its uid.
  class Meter {
   public:
    explicit Meter(std::shared_ptr<Account> account) noexcept : account_(std::move(account)) {}
    Meter(const Meter&) = delete;
    Meter& operator=(const Meter&) = delete;
    [[nodiscard]] std::size_t bytes() const noexcept {
      return bytes_.load(std::memory_order_relaxed);
    }
    [[nodiscard]] const Account& account() const noexcept { return *account_; }

   private:
    friend class MemoryBudget;
    std::shared_ptr<Account> account_;
    std::atomic<std::size_t> bytes_{0};
  };

  /// Bytes charged to a meter (its connection, uid and the agent) for as long as it lives.
  class Charge {
   public:
    Charge() noexcept = default;
    Charge(std::shared_ptr<Meter> meter, std::size_t bytes);
    ~Charge() { resize(0); }
    Charge(Charge&& other) noexcept;
    Charge& operator=(Charge&& other) noexcept;
    Charge(const Charge&) = delete;
    Charge& operator=(const Charge&) = delete;

    /// Charges or releases the difference: the charge now stands for `bytes`. No-op without a
    /// meter.
    void resize(std::size_t bytes) noexcept;
    [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

   private:
    std::shared_ptr<Meter> meter_;
    std::size_t bytes_ = 0;
  };

  /// `limit` 0 means no shared budget: only light connections read (for tests; the flag's
  /// minimum is far above 0). `on_room` may be empty.
  MemoryBudget(std::size_t limit, std::function<void()> on_room);
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  /// Loop thread: the account of `uid`, created on first use; it lives as long as anything of
  /// that uid holds it.
  [[nodiscard]] std::shared_ptr<Account> account(uid_t uid);
  /// A new meter for a connection of `account`.
  [[nodiscard]] static std::shared_ptr<Meter> meter(std::shared_ptr<Account> account);

  /// Loop thread: how many bytes (at most `wanted`) a connection with `meter` may read now; 0:
  /// none until bytes are released (then call wait_for_room()).
  [[nodiscard]] std::size_t read_room(const Meter& meter, std::size_t wanted) const noexcept;
  /// Loop thread: a reader found no room; `on_room` runs at the next release.
  void wait_for_room() noexcept;

  [[nodiscard]] std::size_t limit() const noexcept { return limit_; }
  /// Bytes held now, in all.
  [[nodiscard]] std::size_t used() const noexcept { return used_.load(std::memory_order_relaxed); }
  /// The most bytes held at once since the last take_peak(), which restarts it from now.
  [[nodiscard]] std::size_t take_peak() noexcept {
    return peak_.exchange(used(), std::memory_order_relaxed);
  }
  /// Loop thread: uids the account table holds (live ones, and dropped ones not yet swept).
  [[nodiscard]] std::size_t tracked_uids() const noexcept { return accounts_.size(); }
  /// The uids holding bytes now.
  [[nodiscard]] std::size_t active_uids() const noexcept {
    return active_accounts_.load(std::memory_order_relaxed);
  }

 private:
  void add(Meter& meter, std::size_t bytes) noexcept;
  void remove(Meter& meter, std::size_t bytes) noexcept;

  const std::size_t limit_;
  const std::function<void()> on_room_;
  std::atomic<std::size_t> used_{0};
  std::atomic<std::size_t> peak_{0};
  std::atomic<std::size_t> active_accounts_{0};
  std::atomic<bool> waiting_{false};
  std::unordered_map<uid_t, std::weak_ptr<Account>> accounts_;  // loop thread
  std::size_t live_after_sweep_ = 0;                            // loop thread
};

}  // namespace hsm::agent
