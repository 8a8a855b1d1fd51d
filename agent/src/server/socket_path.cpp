#include "server/socket_path.hpp"

#include <fcntl.h>
#include <grp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <vector>

namespace hsm::agent {
namespace {

std::string errno_text() {
  return std::strerror(errno);
}

// True when something accepts connections on `path`.
bool socket_is_live(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), std::min(path.size(), sizeof(addr.sun_path) - 1));
  const bool live = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return live;
}

}  // namespace

bool is_mount_root(const std::string& dir) {
#ifndef STATX_ATTR_MOUNT_ROOT
  constexpr std::uint64_t STATX_ATTR_MOUNT_ROOT = 0x00002000;  // Linux 5.8; older headers
#endif
  struct statx stx {};
  if (::statx(AT_FDCWD, dir.c_str(), 0, STATX_BASIC_STATS, &stx) != 0) {
    throw SocketSetupError("cannot inspect socket directory " + dir + ": " + errno_text());
  }
  if ((stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) != 0) {
    return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
  }
  // Kernels before 5.8: a mount's root has another device than its parent (a bind mount of a
  // directory of the same file system is not recognised, and is therefore refused).
  struct stat own {};
  struct stat parent {};
  const std::string parent_path = dir + "/..";
  if (::stat(dir.c_str(), &own) != 0 || ::stat(parent_path.c_str(), &parent) != 0) {
    throw SocketSetupError("cannot inspect socket directory " + dir + ": " + errno_text());
  }
  return own.st_dev != parent.st_dev;
}

void prepare_socket_path(const std::string& path, SharedDirPolicy shared_dir) {
  const std::filesystem::path socket_path(path);
  const auto dir =
      socket_path.has_parent_path() ? socket_path.parent_path() : std::filesystem::path(".");
  struct stat dir_stat {};
  if (::stat(dir.c_str(), &dir_stat) != 0) {
    throw SocketSetupError("socket directory " + dir.string() + " is not usable: " + errno_text());
  }
  if (!S_ISDIR(dir_stat.st_mode)) {
    throw SocketSetupError("socket directory " + dir.string() + " is not a directory");
  }
  if ((dir_stat.st_mode & S_IWOTH) != 0 && (dir_stat.st_mode & S_ISVTX) == 0) {
    // Anyone who can write the directory could replace our socket with theirs and receive the
    // applications' requests. A Kubernetes emptyDir is created 0777 (and owned by root, so the
    // agent cannot chmod it), but only the containers that mount it can reach it: with
    // --shared-socket-dir the operator states that only the agent mounts it writable, and the
    // agent still insists on a volume of its own, never a directory inside a shared tree.
    if (shared_dir != SharedDirPolicy::kAllowMountRoot) {
      throw SocketSetupError("socket directory " + dir.string() +
                             " is writable by others and not sticky; use a private directory "
                             "(or, for a Kubernetes emptyDir, --shared-socket-dir)");
    }
    if (!is_mount_root(dir.string())) {
      throw SocketSetupError("socket directory " + dir.string() +
                             " is writable by others and is not a mount point; "
                             "--shared-socket-dir accepts only a volume of its own "
                             "(a Kubernetes emptyDir)");
    }
    spdlog::info(
        "socket directory {} is a shared volume writable by others (--shared-socket-dir): only "
        "the agent may mount it writable",
        dir.string());
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    throw SocketSetupError("socket directory " + dir.string() +
                           " is not writable: " + errno_text());
  }

  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throw SocketSetupError("cannot inspect socket path " + path + ": " + errno_text());
  }
  if (S_ISLNK(st.st_mode)) {
    throw SocketSetupError("socket path " + path + " is a symbolic link; refusing to follow it");
  }
  if (!S_ISSOCK(st.st_mode)) {
    throw SocketSetupError("socket path " + path + " exists and is not a socket");
  }
  if (socket_is_live(path)) {
    throw SocketSetupError("another agent is already listening on " + path);
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw SocketSetupError("cannot remove stale socket " + path + ": " + errno_text());
  }
}

ScopedUmask::ScopedUmask(mode_t mask) : previous_(::umask(mask)) {}
ScopedUmask::~ScopedUmask() {
  ::umask(previous_);
}

gid_t resolve_group(const std::string& group) {
  if (!group.empty() && group.find_first_not_of("0123456789") == std::string::npos) {
    return static_cast<gid_t>(std::stoul(group));
  }
  std::vector<char> buffer(16384);
  struct group entry {};
  struct group* result = nullptr;
  int rc = 0;
  while ((rc = ::getgrnam_r(group.c_str(), &entry, buffer.data(), buffer.size(), &result)) ==
             ERANGE &&
         buffer.size() < (1U << 20)) {
    buffer.resize(buffer.size() * 2);
  }
  if (rc != 0 || result == nullptr) {
    throw SocketSetupError("unknown --socket-group '" + group + "'");
  }
  return result->gr_gid;
}

void apply_socket_permissions(const std::string& path, mode_t mode,
                              const std::optional<std::string>& group) {
  if (group) {
    const gid_t gid = resolve_group(*group);
    if (::lchown(path.c_str(), static_cast<uid_t>(-1), gid) != 0) {
      throw SocketSetupError("cannot give socket " + path + " to group " + *group + ": " +
                             errno_text());
    }
  }
  if (::chmod(path.c_str(), mode) != 0) {
    throw SocketSetupError("cannot set mode of socket " + path + ": " + errno_text());
  }
}

}  // namespace hsm::agent
