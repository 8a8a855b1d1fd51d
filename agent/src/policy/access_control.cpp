#include "policy/access_control.hpp"

#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace hsm::agent {
namespace {

protocol::Error denied(protocol::Method method, const std::string* kid, std::string_view why = {}) {
  std::string message = "permission denied: ";
  message += protocol::to_string(method);
  if (kid != nullptr) message += " on kid '" + *kid + "'";
  message += why;
  return {protocol::ErrorCode::kPermissionDenied, std::move(message), std::nullopt};
}

/// The first kid of the request that `rule` does not allow, or null when all are allowed (or
/// the method takes no kid).
const std::string* refused_kid(const PolicyRule& rule, const protocol::Params& params) noexcept {
  return std::visit(
      [&rule](const auto& p) -> const std::string* {
        using P = std::decay_t<decltype(p)>;
        if constexpr (std::is_same_v<P, protocol::SignBatchParams>) {
          for (const auto& item : p.items) {
            if (!rule.allows_kid(item.kid)) return &item.kid;
          }
          return nullptr;
        } else if constexpr (requires { p.kid; }) {
          return rule.allows_kid(p.kid) ? nullptr : &p.kid;
        } else {
          return nullptr;
        }
      },
      params);
}

/// The kid a denial names: the request's (for sign_batch its first item's), null without one.
const std::string* first_kid_of(const protocol::Params& params) noexcept {
  return std::visit(
      [](const auto& p) -> const std::string* {
        using P = std::decay_t<decltype(p)>;
        if constexpr (std::is_same_v<P, protocol::SignBatchParams>) {
          return p.items.empty() ? nullptr : &p.items.front().kid;
        } else if constexpr (requires { p.kid; }) {
          return &p.kid;
        } else {
          return nullptr;
        }
      },
      params);
}

}  // namespace

std::vector<PolicyRule> default_policy_rules(const AccessConfig& config, uid_t agent_uid) {
  std::vector<PolicyRule> rules;
  PolicyRule admins;
  admins.name = "default: agent uid, root and --admin-uid";
  admins.match.uids = config.admin_uids;
  admins.match.uids.push_back(agent_uid);
  admins.match.uids.push_back(0);
  admins.methods = MethodSet::all();
  admins.kids.emplace_back("*");
  rules.push_back(std::move(admins));

  if (!config.allow_uids.empty() || !config.allow_gids.empty()) {
    PolicyRule callers;
    callers.name = "default: --allow-uid and --allow-gid";
    callers.match.uids = config.allow_uids;
    callers.match.gids = config.allow_gids;
    callers.methods = MethodSet::all();
    callers.methods.remove(protocol::Method::kGenerateKey);
    callers.methods.remove(protocol::Method::kDeleteKey);
    callers.kids.emplace_back("*");
    rules.push_back(std::move(callers));
  }
  return rules;
}

AccessControl::AccessControl(std::vector<PolicyRule> rules, std::string description, bool read_only)
    : rules_(std::make_shared<const Rules>(std::move(rules))),
      description_(std::move(description)),
      read_only_(read_only) {}

AccessControl::AccessControl(const AccessConfig& config, bool read_only, uid_t agent_uid)
    : description_("default policy"), read_only_(read_only) {
  if (!config.policy_path) {
    rules_ = std::make_shared<const Rules>(default_policy_rules(config, agent_uid));
    return;
  }
  if (!config.allow_uids.empty() || !config.allow_gids.empty() || !config.admin_uids.empty()) {
    // With a policy file these flags would be ignored; refusing says so instead of letting an
    // operator believe --admin-uid took effect.
    throw PolicyError(*config.policy_path, std::nullopt, std::nullopt,
                      "--allow-uid, --allow-gid and --admin-uid apply only without --policy; "
                      "put those callers in the policy file");
  }
  rules_ = std::make_shared<const Rules>(load_policy_file(*config.policy_path));
  policy_path_ = config.policy_path;
  description_ = "policy file " + *policy_path_;
}

AccessControl AccessControl::from_policy_text(std::string_view yaml, const std::string& source,
                                              bool read_only) {
  return AccessControl(parse_policy(yaml, source), "policy " + source, read_only);
}

bool AccessControl::is_admin_method(protocol::Method method) noexcept {
  return method == protocol::Method::kGenerateKey || method == protocol::Method::kDeleteKey;
}

const PolicyRule* AccessControl::first_match(const Rules& rules, const Caller& caller) noexcept {
  for (const auto& rule : rules) {
    if (rule.match.matches(caller)) return &rule;
  }
  return nullptr;
}

std::shared_ptr<const std::vector<PolicyRule>> AccessControl::rules() const {
  std::lock_guard lock(rules_mutex_);
  return rules_;
}

std::shared_ptr<const PolicyRule> AccessControl::rule_for(const Caller& caller) const {
  auto rules = this->rules();
  const PolicyRule* rule = first_match(*rules, caller);
  // Shares ownership of the whole list: the rule outlives a reload.
  return rule == nullptr ? nullptr : std::shared_ptr<const PolicyRule>(std::move(rules), rule);
}

bool AccessControl::admits(const Caller& caller) const noexcept {
  return first_match(*rules(), caller) != nullptr;
}

std::optional<protocol::Error> AccessControl::authorize(const Caller& caller,
                                                        const protocol::Request& request) const {
  if (read_only_ && is_admin_method(request.method)) {
    return denied(request.method, first_kid_of(request.params), " (the agent is read-only)");
  }
  const auto rules = this->rules();  // this request is decided by one list, whatever reload does
  const PolicyRule* rule = first_match(*rules, caller);
  if (rule == nullptr || !rule->methods.contains(request.method)) {
    return denied(request.method, first_kid_of(request.params));
  }
  if (const std::string* kid = refused_kid(*rule, request.params)) {
    return denied(request.method, kid);
  }
  return std::nullopt;
}

std::optional<PolicyError> AccessControl::reload() {
  if (!policy_path_) return std::nullopt;
  try {
    // Parse into a local first: a bad file leaves the current rules untouched. Requests being
    // decided meanwhile keep the list they loaded; the next ones see the new one.
    auto fresh = std::make_shared<const Rules>(load_policy_file(*policy_path_));
    std::lock_guard lock(rules_mutex_);
    rules_.swap(fresh);  // the old list is freed by its last reader (or by `fresh`, unlocked)
  } catch (const PolicyError& e) {
    return e;
  }
  return std::nullopt;
}

}  // namespace hsm::agent
