// Preparing the listening socket's path safely, before and after bind (issue: socket security).
// - never follow a symlink at the path; refuse anything at the path that is not a socket;
// - a stale socket (no one accepts on it) is removed; a live agent's socket is never stolen;
// - refuse a directory that others can write to unless it is sticky;
// - bind happens under umask 0177, so there is no moment the socket is accessible to others;
//   then the mode and group are applied.
#pragma once

#include <sys/types.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace hsm::agent {

class SocketSetupError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Checks the directory and the path, removing a stale socket. Throws SocketSetupError.
void prepare_socket_path(const std::string& path);

/// Restores the previous umask when destroyed. Create it around bind().
class ScopedUmask {
 public:
  explicit ScopedUmask(mode_t mask);
  ~ScopedUmask();
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

 private:
  mode_t previous_;
};

/// Applies mode and group (name or numeric gid) to the bound socket. Throws SocketSetupError.
void apply_socket_permissions(const std::string& path, mode_t mode,
                              const std::optional<std::string>& group);

/// Resolves a group name or numeric gid. Throws SocketSetupError when unknown.
[[nodiscard]] gid_t resolve_group(const std::string& group);

}  // namespace hsm::agent
