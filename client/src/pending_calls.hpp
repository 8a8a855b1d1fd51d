// The calls of one connection that wait for their answer, by msgid.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace hsm::client {

class Call;

/// Hands out msgids and remembers which call each belongs to. msgids count up and wrap around
/// at 2^32; an id still in flight is skipped, never reused. Not thread-safe: the connection
/// guards it with its mutex.
///
/// Each entry also records whether its request is still being written: only its writer knows then
/// whether any byte of it left, so a connection that ends leaves such an entry to its writer
/// (take_all_written()).
class PendingCalls {
 public:
  explicit PendingCalls(std::uint32_t first_msgid = 1) : next_msgid_(first_msgid) {}

  /// Registers `call` under a fresh msgid and returns the msgid. Its request counts as being
  /// written until written() is called.
  std::uint32_t add(std::shared_ptr<Call> call);
  /// The request of `msgid` (if it still belongs to `call`) is no longer being written. True
  /// when the entry is still here.
  bool written(std::uint32_t msgid, const Call* call);
  /// Removes and returns the call waiting for `msgid`; nullptr when there is none (an answer
  /// that came after its call timed out, or a msgid we never sent).
  std::shared_ptr<Call> take(std::uint32_t msgid);
  /// Removes the entry of `msgid` only if it belongs to `call` (a retried call's old msgid may
  /// already belong to another call). True when it was removed.
  bool remove(std::uint32_t msgid, const Call* call);
  /// Removes and returns every waiting call whose request is no longer being written; the
  /// others stay for their writers.
  std::vector<std::shared_ptr<Call>> take_all_written();
  /// Whether `msgid` is still waiting and belongs to `call`.
  [[nodiscard]] bool holds(std::uint32_t msgid, const Call* call) const;
  [[nodiscard]] std::size_t size() const noexcept { return calls_.size(); }
  [[nodiscard]] bool empty() const noexcept { return calls_.empty(); }
  /// Where the msgid counter continues. Tests use it to reach the wrap-around and the ids in
  /// flight without 2^32 calls.
  void set_next_msgid(std::uint32_t msgid) noexcept { next_msgid_ = msgid; }

 private:
  struct Entry {
    std::shared_ptr<Call> call;
    bool being_written = true;
  };
  std::unordered_map<std::uint32_t, Entry> calls_;
  std::uint32_t next_msgid_;
};

}  // namespace hsm::client
