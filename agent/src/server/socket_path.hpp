// Preparing the listening socket's path safely, before and after bind (issue: socket security).
// - never follow a symlink at the path; refuse anything at the path that is not a socket;
// - a stale socket (no one accepts on it) is removed; a live agent's socket is never stolen;
// - refuse a directory that others can write to unless it is sticky, or, with
//   --shared-socket-dir, unless it is the root of a mount of its own (a Kubernetes emptyDir:
//   mode 0777, not sticky, and nothing the agent could chmod; docs/security.md explains why that
//   is acceptable there and nowhere else);
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

/// How prepare_socket_path() treats a socket directory that others may write to.
enum class SharedDirPolicy : unsigned char {
  kRefuse,          // refused unless sticky (the default)
  kAllowMountRoot,  // also accepted when the directory is the root of a mount (--shared-socket-dir)
};

/// Checks the directory and the path, removing a stale socket. Throws SocketSetupError.
void prepare_socket_path(const std::string& path,
                         SharedDirPolicy shared_dir = SharedDirPolicy::kRefuse);

/// Whether `dir` is the root of a mount (a volume of its own, not a directory inside another
/// file system): statx's STATX_ATTR_MOUNT_ROOT when the kernel reports it, else a device number
/// that differs from the parent directory's. Throws SocketSetupError when `dir` cannot be read.
[[nodiscard]] bool is_mount_root(const std::string& dir);

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
