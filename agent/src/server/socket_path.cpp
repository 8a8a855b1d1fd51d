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
#include <system_error>
#include <vector>

#include "config/trusted_path.hpp"
#include "hsm/common/file_descriptor.hpp"

namespace hsm::agent {
namespace {

std::string errno_text() {
  return std::strerror(errno);
}

std::string file_kind(mode_t mode) {
  if (S_ISSOCK(mode)) return "another socket";
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISFIFO(mode)) return "a FIFO";
  return "a device";
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

void check_socket_directory(const std::string& path, SharedDirPolicy shared_dir) {
  const std::filesystem::path socket_path(path);
  const std::string dir =
      socket_path.has_parent_path() ? socket_path.parent_path().string() : std::string(".");
  TrustedPath found;
  try {
    found = resolve_trusted_path(dir, ::geteuid());
  } catch (const UntrustedPathError& e) {
    throw SocketSetupError("socket directory " + dir + ": " + e.what());
  } catch (const std::system_error& e) {
    throw SocketSetupError("socket directory " + dir + " is not usable: " + e.what());
  }
  if (!S_ISDIR(found.st.st_mode)) {
    throw SocketSetupError("socket directory " + dir + " is not a directory");
  }
  if (const auto access = foreign_write_access(found.resolved, found.st)) {
    // Whoever can add a name to the directory can put their socket at the path whenever it is
    // free (the sticky bit does not stop that), or replace ours, and receive the applications'
    // requests. A Kubernetes emptyDir is created 0777 (and owned by root, so the agent cannot
    // chmod it), but only the containers that mount it can reach it: with --shared-socket-dir the
    // operator states that only the agent mounts it writable, and the agent still insists on a
    // volume of its own, never a directory inside a shared tree.
    const bool by_others = (found.st.st_mode & S_IWOTH) != 0;
    if (shared_dir == SharedDirPolicy::kAllowMountRoot) {
      bool mount_root = false;
      try {
        mount_root = is_mount_root(found.resolved);
      } catch (const std::system_error& e) {
        throw SocketSetupError("cannot inspect socket directory " + dir + ": " + e.what());
      }
      if (!mount_root) {
        throw SocketSetupError("socket directory " + dir + ": " + access->description +
                               " and is not a mount point; --shared-socket-dir accepts only a "
                               "volume of its own (a Kubernetes emptyDir)");
      }
      spdlog::info(
          "socket directory {} is a shared volume writable by others (--shared-socket-dir): only "
          "the agent may mount it writable",
          dir);
    } else {
      const std::string sticky = (found.st.st_mode & S_ISVTX) != 0
                                     ? " (the sticky bit does not stop that)"
                                     : std::string();
      throw SocketSetupError(
          "socket directory " + dir + ": " + access->description + ", so " + access->who +
          " could put their own socket at its path" + sticky + ": " + access->fix +
          ", or use a directory only root and the agent's uid can write" +
          (by_others ? " (for a Kubernetes emptyDir: --shared-socket-dir)" : ""));
    }
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    throw SocketSetupError("socket directory " + dir + " is not writable: " + errno_text());
  }
}

void prepare_socket_path(const std::string& path, SharedDirPolicy shared_dir) {
  check_socket_directory(path, shared_dir);
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

SocketFile secure_bound_socket(const std::string& path, mode_t mode,
                               const std::optional<std::string>& group) {
  // Linux has no chmod for a socket's file through the socket (fchmod on it changes the socket
  // inode, not the file), and chmod(path) or chown(path) would follow a symlink put at the path
  // since bind. So the file is opened by path once, without following a symlink (O_PATH |
  // O_NOFOLLOW), and everything after acts on that descriptor: fchownat(AT_EMPTY_PATH), and chmod
  // of /proc/self/fd/N, which acts on the inode the descriptor holds (glibc's
  // fchmodat(AT_SYMLINK_NOFOLLOW) does the same; fchmodat2 is Linux 6.6). Which file is it? bind()
  // created it (it fails when the path exists) in a directory only root and the agent's uid can
  // write (check_socket_directory), so the socket file owned by the agent's uid found there now
  // is the one bind made; with --shared-socket-dir the operator vouches that no one else
  // mounts the directory writable. Its device and inode then identify the socket from now on.
  const common::FileDescriptor file(::open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (file.get() < 0) throw SocketSetupError("cannot open socket " + path + ": " + errno_text());
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) {
    throw SocketSetupError("cannot inspect socket " + path + ": " + errno_text());
  }
  if (!S_ISSOCK(st.st_mode) || st.st_uid != ::geteuid()) {
    throw SocketSetupError("socket path " + path +
                           " was replaced right after bind: it no longer names the agent's socket");
  }
  if (group) {
    const gid_t gid = resolve_group(*group);
    if (::fchownat(file.get(), "", static_cast<uid_t>(-1), gid, AT_EMPTY_PATH) != 0) {
      throw SocketSetupError("cannot give socket " + path + " to group " + *group + ": " +
                             errno_text());
    }
  }
  const std::string by_descriptor = "/proc/self/fd/" + std::to_string(file.get());
  if (::chmod(by_descriptor.c_str(), mode) != 0) {
    throw SocketSetupError("cannot set mode of socket " + path + " (through " + by_descriptor +
                           "; /proc must be mounted): " + errno_text());
  }
  return {st.st_dev, st.st_ino};
}

SocketPathState inspect_socket_path(const std::string& path, const SocketFile& ours) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {false, true, "no longer exists (deleted or renamed)"};
    return {false, false, "cannot be inspected: " + errno_text()};
  }
  if (S_ISSOCK(st.st_mode) && SocketFile{st.st_dev, st.st_ino} == ours) return {true, false, {}};
  return {false, false,
          "is not this agent's socket: it is now " + file_kind(st.st_mode) + " owned by uid " +
              std::to_string(st.st_uid) + "; the agent binds again once it is removed"};
}

void remove_socket_if_ours(const std::string& path, const SocketFile& ours) noexcept {
  if (inspect_socket_path(path, ours).ours) ::unlink(path.c_str());
}

}  // namespace hsm::agent
