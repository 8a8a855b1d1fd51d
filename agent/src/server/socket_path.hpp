// Preparing the listening socket's path safely, before and after bind (issue: socket security;
// issue 15, items 6 and 9).
// - the socket's directory, and every directory above it, can be changed by root and the agent's
//   uid only (config/trusted_path.hpp); the directory itself may not be writable by group or
//   others even when sticky, unless, with --shared-socket-dir, it is the root of a mount of its
//   own (a Kubernetes emptyDir: mode 0777, not sticky, and nothing the agent could chmod;
//   docs/security.md explains why that is acceptable there and nowhere else);
// - never follow a symlink at the path; refuse anything at the path that is not a socket;
// - a stale socket (no one accepts on it) is removed; a live agent's socket is never stolen;
// - bind happens under umask 0177, so there is no moment the socket is accessible to others;
//   then the group and mode are applied to the file bind made, never through a path that could
//   have become a symlink (secure_bound_socket);
// - afterwards the agent can tell whether the path still names its socket (inspect_socket_path),
//   and removes it at exit only if it does.
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

/// How the socket's directory may be shared with others.
enum class SharedDirPolicy : unsigned char {
  kRefuse,          // refused when group or others may write it (the default)
  kAllowMountRoot,  // accepted when the directory is the root of a mount (--shared-socket-dir)
};

/// Checks the socket's directory (see above). Throws SocketSetupError naming the directory, the
/// component at fault and the fix.
void check_socket_directory(const std::string& path, SharedDirPolicy shared_dir);

/// check_socket_directory(), then checks the path, removing a stale socket. Throws
/// SocketSetupError.
void prepare_socket_path(const std::string& path,
                         SharedDirPolicy shared_dir = SharedDirPolicy::kRefuse);

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

/// The file bind() made for the listening socket: the path names the agent's socket while it
/// names this file.
struct SocketFile {
  dev_t device = 0;
  ino_t inode = 0;
  friend bool operator==(const SocketFile&, const SocketFile&) = default;
};

/// Right after bind(), before listen(): gives the socket file `group` (name or numeric gid) and
/// `mode` without following a symlink at `path`, and returns which file it is. Throws
/// SocketSetupError.
[[nodiscard]] SocketFile secure_bound_socket(const std::string& path, mode_t mode,
                                             const std::optional<std::string>& group);

/// What `path` names compared with the agent's socket file.
struct SocketPathState {
  bool ours = false;    // it names `ours`
  bool free = false;    // nothing is there: a socket may be bound again
  std::string problem;  // when not ours: "no longer exists (...)", "is now a regular file ..."
};
[[nodiscard]] SocketPathState inspect_socket_path(const std::string& path, const SocketFile& ours);

/// Removes the socket at `path` if it is still `ours`; never anyone else's file.
void remove_socket_if_ours(const std::string& path, const SocketFile& ours) noexcept;

/// Resolves a group name or numeric gid. Throws SocketSetupError when unknown.
[[nodiscard]] gid_t resolve_group(const std::string& group);

}  // namespace hsm::agent
