// The compiled form of an access policy: an ordered list of PolicyRule, each saying which
// callers it selects (CallerMatch), which methods it grants (MethodSet) and on which kids
// (KidPattern). Built once (policy file or the default flags) and only read afterwards; the
// per-request checks neither allocate nor lock. The format and its semantics: docs/policy.md.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace hsm::agent {

/// A set of protocol methods, as a bitmask (one bit per protocol::Method).
class MethodSet {
 public:
  constexpr MethodSet() noexcept = default;
  /// Every method the protocol has (the policy's "*").
  [[nodiscard]] static MethodSet all() noexcept;

  constexpr void add(protocol::Method method) noexcept { bits_ |= bit(method); }
  constexpr void remove(protocol::Method method) noexcept { bits_ &= ~bit(method); }
  [[nodiscard]] constexpr bool contains(protocol::Method method) const noexcept {
    return (bits_ & bit(method)) != 0;
  }
  [[nodiscard]] constexpr bool empty() const noexcept { return bits_ == 0; }
  friend constexpr bool operator==(MethodSet, MethodSet) noexcept = default;

 private:
  static constexpr std::uint32_t bit(protocol::Method method) noexcept {
    return std::uint32_t{1} << static_cast<unsigned>(method);
  }
  std::uint32_t bits_ = 0;
};

/// Whether a method's parameters name a key (sign, verify, get_public_key, generate_key,
/// delete_key, sign_batch): those are the methods a rule's `kids` restrict.
[[nodiscard]] bool method_takes_kid(protocol::Method method) noexcept;

/// One glob pattern over kids, with fnmatch(3) semantics and flags 0: `*` any run of bytes
/// (including none and including '/'), `?` one byte, `[...]` a byte set, `\` escapes the next
/// character (so `\*` matches a literal '*'). Bytewise: the agent runs in the C locale.
/// The common shapes ("*", an exact kid, "prefix*") are recognised once, here, and matched
/// without fnmatch.
class KidPattern {
 public:
  /// `pattern` must be valid (see problem()); the parser checks it first.
  explicit KidPattern(std::string pattern);

  /// Why `pattern` cannot be a kid pattern, or empty when it can.
  [[nodiscard]] static std::string problem(std::string_view pattern);

  [[nodiscard]] bool matches(const std::string& kid) const noexcept;
  [[nodiscard]] const std::string& text() const noexcept { return pattern_; }

 private:
  enum class Kind : std::uint8_t { kAny, kExact, kPrefix, kGlob };
  Kind kind_ = Kind::kGlob;
  std::string pattern_;
  std::string literal_;  // kExact: the kid; kPrefix: the prefix
};

/// Which callers a rule selects: everyone (`any`), or the caller's uid is in `uids` OR its gid
/// (the primary gid SO_PEERCRED reports, not supplementary groups) is in `gids`.
struct CallerMatch {
  bool any = false;
  std::vector<uid_t> uids;
  std::vector<gid_t> gids;

  [[nodiscard]] bool matches(const Caller& caller) const noexcept;
};

struct PolicyRule {
  std::string name;  // for operators and tests; never sent to a caller
  CallerMatch match;
  MethodSet methods;
  /// The kids the rule's kid-taking methods may use. Empty: the rule grants no kid-taking
  /// method (the parser guarantees it; a kid is then refused).
  std::vector<KidPattern> kids;

  [[nodiscard]] bool allows_kid(const std::string& kid) const noexcept;
};

}  // namespace hsm::agent
