#include "policy/access_control.hpp"

#include <algorithm>
#include <string>

namespace hsm::agent {
namespace {

template <typename T>
bool contains(const std::vector<T>& values, T value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

std::string denied_message(const protocol::Request& request) {
  std::string message = "permission denied: ";
  message += protocol::to_string(request.method);
  std::visit(
      [&message](const auto& params) {
        if constexpr (requires { params.kid; }) message += " on kid '" + params.kid + "'";
      },
      request.params);
  return message;
}

}  // namespace

AccessControl::AccessControl(const AccessConfig& config, bool read_only, uid_t agent_uid)
    : admin_uids_(config.admin_uids),
      user_uids_(config.allow_uids),
      user_gids_(config.allow_gids),
      read_only_(read_only) {
  admin_uids_.push_back(agent_uid);
  admin_uids_.push_back(0);
}

bool AccessControl::is_admin_method(protocol::Method method) noexcept {
  return method == protocol::Method::kGenerateKey || method == protocol::Method::kDeleteKey;
}

AccessControl::Grant AccessControl::grant_for(const Caller& caller) const {
  if (contains(admin_uids_, caller.uid)) return Grant::kAdmin;
  if (contains(user_uids_, caller.uid) || contains(user_gids_, caller.gid)) return Grant::kUser;
  return Grant::kNone;
}

bool AccessControl::admits(const Caller& caller) const { return grant_for(caller) != Grant::kNone; }

std::optional<protocol::Error> AccessControl::authorize(const Caller& caller,
                                                        const protocol::Request& request) const {
  if (!is_admin_method(request.method)) {
    return grant_for(caller) == Grant::kNone
               ? std::optional(protocol::Error{protocol::ErrorCode::kPermissionDenied,
                                               denied_message(request), std::nullopt})
               : std::nullopt;
  }
  if (read_only_) {
    return protocol::Error{protocol::ErrorCode::kPermissionDenied,
                           denied_message(request) + " (the agent is read-only)", std::nullopt};
  }
  if (grant_for(caller) != Grant::kAdmin) {
    return protocol::Error{protocol::ErrorCode::kPermissionDenied, denied_message(request),
                           std::nullopt};
  }
  return std::nullopt;
}

}  // namespace hsm::agent
