// AccessControl: who may connect (checked at accept) and what each caller may do (checked per
// request, before any work is queued). A denial names the method and kid, never the rule.
//
// Without a policy file the default is safe: the agent's own uid and root may connect and use
// every method; --allow-uid / --allow-gid callers get the non-admin methods; --admin-uid
// callers get every method; --read-only removes generate_key and delete_key for everyone.
// Thread-safety: admits()/authorize() run on the loop thread; reload() too (SIGHUP).
#pragma once

#include <sys/types.h>

#include <optional>
#include <vector>

#include "config/agent_config.hpp"
#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace hsm::agent {

class AccessControl {
 public:
  AccessControl(const AccessConfig& config, bool read_only, uid_t agent_uid);

  /// May this caller connect at all?
  [[nodiscard]] bool admits(const Caller& caller) const;
  /// nullopt when allowed; else the permission_denied error to answer.
  [[nodiscard]] std::optional<protocol::Error> authorize(const Caller& caller,
                                                         const protocol::Request& request) const;

  /// Methods that change the token (generate_key, delete_key).
  [[nodiscard]] static bool is_admin_method(protocol::Method method) noexcept;

 private:
  enum class Grant { kNone, kUser, kAdmin };
  [[nodiscard]] Grant grant_for(const Caller& caller) const;

  std::vector<uid_t> admin_uids_;
  std::vector<uid_t> user_uids_;
  std::vector<gid_t> user_gids_;
  bool read_only_;
};

}  // namespace hsm::agent
