#include "unix_socket.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "hsm/client.hpp"

namespace hsm::client {
namespace {

[[noreturn]] void fail(const std::string& path, const char* what, int error) {
  throw Error(std::string(kConnectionFailed),
              "cannot connect to " + path + ": " + what + ": " +
                  std::error_code(error, std::generic_category()).message());
}

}  // namespace

UniqueFd connect_unix_socket(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    throw Error(std::string(kConnectionFailed),
                "cannot connect to '" + path + "': a Unix socket path must have 1 to " +
                    std::to_string(sizeof(address.sun_path) - 1) + " bytes");
  }
  std::memcpy(address.sun_path, path.data(), path.size());

  UniqueFd fd{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)};
  if (!fd.valid()) {
    fail(path, "socket", errno);
  }
  // Non-blocking connect: for AF_UNIX it completes at once or fails at once (EAGAIN when the
  // listener's backlog is full), so a call never waits here. Any failure, EINTR included, is
  // reported; the pool retries after a backoff.
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): the sockets API
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    fail(path, "connect", errno);
  }

  // Back to blocking mode: the reader thread blocks in recv(); writes pass MSG_DONTWAIT.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    fail(path, "fcntl", errno);
  }
  return fd;
}

}  // namespace hsm::client
