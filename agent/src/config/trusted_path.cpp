#include "config/trusted_path.hpp"

#include <fcntl.h>
#include <limits.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <vector>

namespace hsm::agent {
namespace {

// As the kernel's MAXSYMLINKS: more links than this on one path is a loop.
constexpr int kMaxSymlinks = 40;

[[noreturn]] void throw_lookup_error(int error, const std::string& path) {
  throw std::system_error(error, std::generic_category(), path);
}

struct stat lstat_or_throw(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) throw_lookup_error(errno, path);
  return st;
}

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof(text), "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

std::string parent_of(const std::string& resolved) {
  const auto slash = resolved.find_last_of('/');
  return slash == 0 ? std::string("/") : resolved.substr(0, slash);
}

std::string join(const std::string& directory, std::string_view name) {
  return directory == "/" ? "/" + std::string(name) : directory + "/" + std::string(name);
}

/// Appends the components of `path` to `pending`, last first (pending.back() is the next one).
void push_components(std::string_view path, std::vector<std::string>& pending) {
  std::vector<std::string> components;
  std::size_t at = 0;
  while (at <= path.size()) {
    const auto slash = path.find('/', at);
    const auto end = slash == std::string_view::npos ? path.size() : slash;
    if (end > at) components.emplace_back(path.substr(at, end - at));
    at = end + 1;
  }
  pending.insert(pending.end(), components.rbegin(), components.rend());
}

std::string read_link(const std::string& path, const struct stat& st) {
  // st_size is the target's length (0 on some pseudo file systems: then read up to PATH_MAX).
  const auto size = st.st_size > 0 && st.st_size < PATH_MAX ? st.st_size + 1 : PATH_MAX;
  std::string target(static_cast<std::size_t>(size), '\0');
  const ssize_t n = ::readlink(path.c_str(), target.data(), target.size());
  if (n < 0) throw_lookup_error(errno, path);
  if (static_cast<std::size_t>(n) >= target.size()) throw_lookup_error(ENAMETOOLONG, path);
  if (n == 0) throw_lookup_error(ENOENT, path);
  target.resize(static_cast<std::size_t>(n));
  return target;
}

void check_owner(const std::string& path, const struct stat& st, uid_t agent_uid) {
  if (st.st_uid == 0 || st.st_uid == agent_uid) return;
  const std::string owners =
      agent_uid == 0 ? std::string("root") : "root and uid " + std::to_string(agent_uid);
  const char* power = S_ISDIR(st.st_mode)   ? "could rename what it holds"
                      : S_ISLNK(st.st_mode) ? "could point it elsewhere"
                                            : "could rewrite it";
  throw UntrustedPathError(path + " is owned by uid " + std::to_string(st.st_uid) + ", who " +
                           power + "; only " + owners + " may own the path's components (chown " +
                           (S_ISLNK(st.st_mode) ? "-h " : "") + "root " + path +
                           ", or use a path they own)");
}

/// `directory` (lstat `st`) is about to be searched for a name: whoever may write it decides
/// what the name is.
void check_passage(const std::string& directory, const struct stat& st) {
  if ((st.st_mode & S_ISVTX) != 0) return;  // names root and the agent own are theirs to move
  if (const auto access = foreign_write_access(directory, st)) {
    throw UntrustedPathError(access->description + ", so " + access->who +
                             " could rename what it holds (" + access->fix + ", or chmod +t " +
                             directory + ")");
  }
}

}  // namespace

TrustedPath resolve_trusted_path(const std::string& path, uid_t agent_uid) {
  if (path.empty()) throw_lookup_error(ENOENT, path);
  std::vector<std::string> pending;
  push_components(path, pending);
  if (path.front() != '/') {
    // The working directory is a path like any other: it is resolved and checked too.
    push_components(std::filesystem::current_path().string(), pending);
  }
  TrustedPath current{"/", lstat_or_throw("/")};
  check_owner(current.resolved, current.st, agent_uid);
  int links = 0;
  while (!pending.empty()) {
    const std::string name = std::move(pending.back());
    pending.pop_back();
    if (name == ".") continue;
    if (name == "..") {
      // `current` has no symlinks in it: its lexical parent is its real parent, which was
      // checked on the way down.
      current.resolved = parent_of(current.resolved);
      current.st = lstat_or_throw(current.resolved);
      continue;
    }
    if (!S_ISDIR(current.st.st_mode)) throw_lookup_error(ENOTDIR, current.resolved);
    check_passage(current.resolved, current.st);
    const std::string next = join(current.resolved, name);
    const struct stat st = lstat_or_throw(next);
    check_owner(next, st, agent_uid);
    if (!S_ISLNK(st.st_mode)) {
      current = {next, st};
      continue;
    }
    if (++links > kMaxSymlinks) throw_lookup_error(ELOOP, path);
    const std::string target = read_link(next, st);
    push_components(target, pending);
    if (target.front() == '/') current = {"/", lstat_or_throw("/")};
  }
  return current;
}

std::optional<ForeignWriteAccess> foreign_write_access(const std::string& path,
                                                       const struct stat& st) {
  const bool group = (st.st_mode & S_IWGRP) != 0;
  const bool others = (st.st_mode & S_IWOTH) != 0;
  if (!group && !others) return std::nullopt;
  struct statvfs vfs {};
  if (::statvfs(path.c_str(), &vfs) == 0 && (vfs.f_flag & ST_RDONLY) != 0) return std::nullopt;
  const std::string mode = " (mode " + mode_text(st.st_mode) + ")";
  if (others) {
    return ForeignWriteAccess{path + " is writable by others" + mode, "anyone",
                              std::string(group ? "chmod go-w " : "chmod o-w ") + path};
  }
  const std::string gid = std::to_string(st.st_gid);
  return ForeignWriteAccess{path + " is writable by group " + gid + mode, "members of group " + gid,
                            "chmod g-w " + path};
}

bool is_mount_root(const std::string& dir) {
#ifndef STATX_ATTR_MOUNT_ROOT
  constexpr std::uint64_t STATX_ATTR_MOUNT_ROOT = 0x00002000;  // Linux 5.8; older headers
#endif
  struct statx stx {};
  if (::statx(AT_FDCWD, dir.c_str(), 0, STATX_BASIC_STATS, &stx) != 0) {
    throw_lookup_error(errno, dir);
  }
  if ((stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) != 0) {
    return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
  }
  // Kernels before 5.8: a mount's root has another device than its parent (a bind mount of a
  // directory of the same file system is not recognised, and is therefore refused).
  struct stat own {};
  struct stat parent {};
  const std::string parent_path = dir + "/..";
  if (::stat(dir.c_str(), &own) != 0) throw_lookup_error(errno, dir);
  if (::stat(parent_path.c_str(), &parent) != 0) throw_lookup_error(errno, parent_path);
  return own.st_dev != parent.st_dev;
}

}  // namespace hsm::agent
