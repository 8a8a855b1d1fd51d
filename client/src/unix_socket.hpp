// The file descriptor of a connected Unix stream socket, and how to get one.
#pragma once

#include <string>
#include <utility>

namespace hsm::client {

/// Owns one file descriptor; closes it on destruction. Move-only.
class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

/// Connects to the Unix stream socket at `path` without ever blocking (a listener whose
/// backlog is full is a failure, like a missing one). The descriptor is close-on-exec and in
/// blocking mode. Throws hsm::Error(connection_failed) naming the path and the reason.
[[nodiscard]] UniqueFd connect_unix_socket(const std::string& path);

}  // namespace hsm::client
