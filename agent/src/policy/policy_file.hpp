// The policy file (--policy PATH): YAML, documented in docs/policy.md. Parsing is strict: an
// unknown key, method or uid, a missing `match`, or a rule that grants a kid-taking method
// without `kids` is an error naming the file, line and column, so a typo never silently
// widens or narrows what callers may do.
// Thread-safety: free functions without shared state; safe from any thread.
#pragma once

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "policy/rule.hpp"

namespace hsm::agent {

/// A policy that cannot be used: unreadable, not YAML, or not a valid policy. The message is
/// one line for the operator: "<file>:<line>:<column>: <problem>" (line and column 1-based;
/// "<file>: <problem>" when there is no position). Contains no secret.
class PolicyError : public std::runtime_error {
 public:
  PolicyError(std::string source, std::optional<std::size_t> line,
              std::optional<std::size_t> column, const std::string& problem);

  [[nodiscard]] const std::string& source() const noexcept { return source_; }
  /// 1-based line of the offending text, when known.
  [[nodiscard]] std::optional<std::size_t> line() const noexcept { return line_; }
  [[nodiscard]] std::optional<std::size_t> column() const noexcept { return column_; }

 private:
  std::string source_;
  std::optional<std::size_t> line_;
  std::optional<std::size_t> column_;
};

/// Limits on a policy, so a pathological file cannot make loading slow or huge.
inline constexpr std::size_t kMaxPolicyFileBytes = std::size_t{1024} * 1024;
inline constexpr std::size_t kMaxPolicyRules = 1000;
inline constexpr std::size_t kMaxPolicyListItems = 10000;  // uids, gids, methods or kids of a rule

/// Parses policy text into its rules, in file order. `source` names the text in errors (the
/// file path). Throws PolicyError.
[[nodiscard]] std::vector<PolicyRule> parse_policy(std::string_view text,
                                                   const std::string& source);

/// Reads and parses the policy file at `path`. Refuses a file larger than kMaxPolicyFileBytes,
/// one that is not a regular file (a FIFO, a device or a directory is refused before it is
/// opened, so loading never waits), and one that someone other than root and the agent's uid
/// could change: the file or any directory or symlink on its path owned by another uid, or
/// writable by group or others (config/trusted_path.hpp has the rule and its exceptions: sticky
/// directories on the way, read-only mounts). Symlinks are followed, each checked where it lies
/// (a Kubernetes ConfigMap mount is a chain of them); the file they lead to is opened with
/// O_NOFOLLOW. Throws PolicyError.
[[nodiscard]] std::vector<PolicyRule> load_policy_file(const std::string& path);

}  // namespace hsm::agent
