// AccessControl: who may connect (checked at accept) and what each caller may do (checked per
// request, before any work is queued). A denial names the method and kid, never the rule.
//
// Both the policy file (--policy) and the default are an ordered list of PolicyRule, and the
// same rule applies: the FIRST rule whose `match` selects the caller is that caller's rule,
// and only its grants count (later rules are never consulted for that caller). A caller that
// no rule selects is refused at accept. docs/policy.md has the format and examples.
//
// Without a policy file the default is safe, and is two rules: (1) the agent's own uid, root and
// every --admin-uid get every method on every kid; (2) --allow-uid / --allow-gid callers get
// every method except generate_key and delete_key. With a policy file, the policy alone decides
// (the agent's own uid and root are not added), and --allow-uid / --allow-gid / --admin-uid are
// refused as contradictory. --read-only removes generate_key and delete_key for everyone in
// both cases.
//
// Thread-safety: every member is safe from any thread. The rules are an immutable list that
// reload() replaces as a whole: admits() and authorize() (the event loop) decide on the list in
// force when they start, never on a half-replaced one, while reload() runs on its own thread
// (SIGHUP, off the loop: reading a file may be slow). The shared_ptr to the list is copied and
// swapped under a mutex held for nothing else (std::atomic<std::shared_ptr> would do, but
// libstdc++ 12 implements it with a lock bit ThreadSanitizer cannot see). reload() calls do not
// overlap (the server runs one at a time). authorize() allocates nothing when it allows a
// request.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/agent_config.hpp"
#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"
#include "policy/policy_file.hpp"
#include "policy/rule.hpp"

namespace hsm::agent {

class AccessControl {
 public:
  /// The policy file when config.policy_path is set, else the default policy from the flags.
  /// Throws PolicyError (bad or unreadable file; a policy file together with --allow-uid,
  /// --allow-gid or --admin-uid). The agent must not start when it throws.
  AccessControl(const AccessConfig& config, bool read_only, uid_t agent_uid);

  /// Policy text, for tests and tools: `source` names it in errors. Throws PolicyError.
  [[nodiscard]] static AccessControl from_policy_text(std::string_view yaml,
                                                      const std::string& source, bool read_only);

  /// May this caller connect at all? (Some rule selects it.)
  [[nodiscard]] bool admits(const Caller& caller) const noexcept;
  /// nullopt when allowed; else the permission_denied error to answer. For sign_batch every
  /// item's kid must be allowed (else the whole request is denied, naming the first kid refused).
  [[nodiscard]] std::optional<protocol::Error> authorize(const Caller& caller,
                                                         const protocol::Request& request) const;

  /// Re-reads the policy file (SIGHUP). On success the new rules replace these, for every
  /// connection's next request; on error nothing changes and the error is returned, for the
  /// caller to log. Connections stay open either way: a caller the new policy no longer selects
  /// keeps its connection, but each of its requests is denied. Without a policy file there is
  /// nothing to re-read: returns nullopt and changes nothing.
  [[nodiscard]] std::optional<PolicyError> reload();

  /// The rule that decides for this caller (the first that selects it), or null. For logs and
  /// tests; it stays valid (it keeps its list alive) after a reload().
  [[nodiscard]] std::shared_ptr<const PolicyRule> rule_for(const Caller& caller) const;
  /// The rules in force.
  [[nodiscard]] std::shared_ptr<const std::vector<PolicyRule>> rules() const;
  /// "policy file <path>" or "default policy", for logs.
  [[nodiscard]] const std::string& description() const noexcept { return description_; }
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }

  /// Methods that change the token (generate_key, delete_key).
  [[nodiscard]] static bool is_admin_method(protocol::Method method) noexcept;

 private:
  AccessControl(std::vector<PolicyRule> rules, std::string description, bool read_only);

  using Rules = std::vector<PolicyRule>;

  /// The first rule of `rules` that selects the caller, or null.
  static const PolicyRule* first_match(const Rules& rules, const Caller& caller) noexcept;

  mutable std::mutex rules_mutex_;          // guards the pointer, not the list (immutable)
  std::shared_ptr<const Rules> rules_;      // never null
  std::optional<std::string> policy_path_;  // what reload() re-reads; nullopt: nothing
  std::string description_;
  bool read_only_;
};

/// The rules of the default policy (no policy file), in order; exposed for tests and docs.
[[nodiscard]] std::vector<PolicyRule> default_policy_rules(const AccessConfig& config,
                                                           uid_t agent_uid);

}  // namespace hsm::agent
