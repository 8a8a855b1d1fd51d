// Trusted paths (issue 15, item 6): the socket's directory and the policy file may be changed by
// root and the agent's own uid only. Whoever else can write a directory on the way can rename
// what the agent uses and put their own in its place: their socket receives the applications'
// requests (and answers them with forged signatures), their policy grants them every key.
//
// The rule follows OpenSSH's safe_path() (StrictModes): the path is resolved one component at a
// time from "/", following symlinks, and
//   - every directory on the way, every symlink met and the object the path ends at are owned by
//     root or the agent's uid;
//   - no directory on the way is writable by group or others (whatever the group), except
//       * a sticky directory (/tmp): others may add names to it, but cannot rename or remove
//         entries that root or the agent own, and every entry on the path is checked to be
//         theirs;
//       * a directory on a read-only mount: no one writes it through that mount. A Kubernetes
//         ConfigMap volume is a 0777 directory the kubelet bind-mounts read-only (a read-only
//         bind mount of a directory others can write elsewhere is not detected: only root sets
//         mounts up, and on a node the kubelet's directories are root's).
// What the path ends at is judged by the caller with foreign_write_access(): the policy file
// must not be writable by group or others; the socket's directory neither, sticky or not
// (whoever can add a name there can take the socket's name whenever it is free), unless
// --shared-socket-dir accepts it (server/socket_path.hpp).
//
// Resolving the path here, instead of trusting open() to follow it, is what makes a symlinked
// policy (a ConfigMap's policy.yaml -> ..data/policy.yaml) both usable and safe: every link is
// checked where it lies, and the file is then opened by its resolved path with O_NOFOLLOW.
//
// Thread-safety: free functions without state. They lstat, readlink and statvfs; nothing more.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace hsm::agent {

/// A path someone other than root and the agent's uid could change. The message names the
/// component, who could change it and the fix, e.g. "/run/x is owned by uid 1000, who could
/// replace what it holds: ...". Lookup failures (a missing component) are std::system_error.
class UntrustedPathError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What a path resolves to.
struct TrustedPath {
  std::string resolved;  // absolute, without symlinks, "." or ".."
  struct stat st {};     // lstat() of `resolved`: never a symlink
};

/// Resolves `path` (relative paths from the working directory) and checks every component as
/// the header comment says, except the write permissions of the object it ends at. Throws
/// UntrustedPathError; std::system_error (code: the errno, what(): "<component>: <strerror>")
/// when a component cannot be looked up, or more than 40 symlinks are met.
[[nodiscard]] TrustedPath resolve_trusted_path(const std::string& path, uid_t agent_uid);

/// Who besides the owner may write the object `st` describes, for the caller's message.
struct ForeignWriteAccess {
  std::string description;  // "/x is writable by group 10000 (mode 0775)", "... by others ..."
  std::string who;          // "members of group 10000", "anyone"
  std::string fix;          // "chmod g-w /x"
};

/// nullopt when neither group nor others may write `path` (whose lstat is `st`), or when it lies
/// on a read-only mount. "Others" is named first when both may write.
[[nodiscard]] std::optional<ForeignWriteAccess> foreign_write_access(const std::string& path,
                                                                     const struct stat& st);

/// Whether `dir` is the root of a mount (a volume of its own, not a directory inside another
/// file system): statx's STATX_ATTR_MOUNT_ROOT when the kernel reports it, else a device number
/// that differs from the parent directory's. Throws std::system_error when `dir` cannot be read.
[[nodiscard]] bool is_mount_root(const std::string& dir);

}  // namespace hsm::agent
