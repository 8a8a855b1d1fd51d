// hsm-bench-floor: the process-boundary floor, the best a signing sidecar reached over a Unix
// socket can do on this machine. Whatever an agent adds on top of it (encoding, queues, thread
// hand-offs, audit) is the agent's; the rest is the cost of crossing a process boundary twice.
//
//   --serve SOCKET    the minimal sidecar: loads the module, logs in and finds the key once
//                     (es256_token.hpp, as hsm-bench-direct), then runs one thread per accepted
//                     connection that reads a fixed-size request, signs it inline on the
//                     connection's own session exactly as a direct thread signs, and writes the
//                     signature back. No encoding, no queue, no hand-off between threads.
//                     Runs until SIGTERM or SIGINT.
//   --connect SOCKET  T threads, each with its own connection, doing synchronous
//                     request/response for a fixed time, measured like the other modes
//                     (latency_report.hpp) and printed as one JSON line: mode "floor", or with
//                     --ping mode "uds_rtt" (the server answers without signing: the bare round
//                     trip over the same socket).
//
// The wire, between this program and itself: on connecting, the client sends one byte naming
// what every request on the connection asks for ('S' sign, 'P' ping); then each request is the
// 32-byte message, answered with 64 bytes: the signature r || s (all zero when signing failed:
// r = s = 0 is never a valid ECDSA signature), or for a ping the request twice.
//
// The PIN is read from --pin-file only (never argv), held in a buffer wiped after C_Login.

#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "es256_token.hpp"
#include "hsm/common/file_descriptor.hpp"
#include "latency_report.hpp"

namespace hsm::bench {
namespace {

// ---- The wire --------------------------------------------------------------------------------

/// The first byte a client sends on a connection: what every request on it asks for.
enum class ConnectionKind : unsigned char { kSign = 'S', kPing = 'P' };

using Request = std::array<unsigned char, kMessageBytes>;
using Reply = std::array<unsigned char, kEs256SignatureBytes>;

/// The answer to a ping: the request twice, so that the client can tell it got its own answer.
Reply ping_reply(const Request& request) {
  Reply reply{};
  std::copy(request.begin(), request.end(), reply.begin());
  std::copy(request.begin(), request.end(), reply.begin() + kMessageBytes);
  return reply;
}

/// The all-zero reply the server sends when it could not sign.
bool is_sign_failure(const Reply& reply) {
  return std::all_of(reply.begin(), reply.end(), [](unsigned char byte) { return byte == 0; });
}

// ---- Sockets ---------------------------------------------------------------------------------

using hsm::common::FileDescriptor;

[[noreturn]] void throw_errno(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof address.sun_path) {
    throw std::runtime_error("socket path must be 1 to " +
                             std::to_string(sizeof address.sun_path - 1) + " bytes: " + path);
  }
  std::copy(path.begin(), path.end(), address.sun_path);
  return address;
}

/// Fills `bytes` from the socket. False when the peer closed the connection (errno then 0) or
/// on an error (errno set).
[[nodiscard]] bool read_exact(int fd, std::span<unsigned char> bytes) {
  while (!bytes.empty()) {
    const ssize_t got = ::recv(fd, bytes.data(), bytes.size(), 0);
    if (got > 0) {
      bytes = bytes.subspan(static_cast<std::size_t>(got));
    } else if (got == 0) {
      errno = 0;
      return false;
    } else if (errno != EINTR) {
      return false;
    }
  }
  return true;
}

/// Writes all of `bytes` (no SIGPIPE when the peer has gone). False on an error (errno set).
[[nodiscard]] bool write_all(int fd, std::span<const unsigned char> bytes) {
  while (!bytes.empty()) {
    const ssize_t sent = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent >= 0) {
      bytes = bytes.subspan(static_cast<std::size_t>(sent));
    } else if (errno != EINTR) {
      return false;
    }
  }
  return true;
}

/// What a failed read_exact() or write_all() means, from errno.
std::string io_failure() {
  return errno == 0 ? std::string("the connection was closed")
                    : std::generic_category().message(errno);
}

/// A listening Unix socket at `path`, readable and writable by this user only (mode 0600 from
/// the moment it exists), accepting connections from processes of this user only. The
/// destructor closes it and removes the socket file.
class UnixListener {
 public:
  explicit UnixListener(std::string path) : path_(std::move(path)) {
    const sockaddr_un address = unix_address(path_);
    socket_ = FileDescriptor(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!socket_.valid()) throw_errno("socket");
    // umask is per process: set around bind only, before any connection thread exists.
    const mode_t previous = ::umask(0177);
    const int bound =
        ::bind(socket_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address);
    const int bind_errno = errno;
    ::umask(previous);
    if (bound != 0) {
      errno = bind_errno;
      throw_errno("bind " + path_);
    }
    bound_ = true;
    if (::listen(socket_.get(), SOMAXCONN) != 0) throw_errno("listen " + path_);
  }
  ~UnixListener() {
    if (bound_) ::unlink(path_.c_str());
  }
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;
  UnixListener(UnixListener&&) = delete;
  UnixListener& operator=(UnixListener&&) = delete;

  [[nodiscard]] int fd() const noexcept { return socket_.get(); }
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

  /// The next pending connection; an invalid descriptor when there was none after all, or when
  /// it came from another user (refused, with a message on stderr). Throws on other errors.
  [[nodiscard]] FileDescriptor accept() {
    FileDescriptor peer(::accept4(socket_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!peer.valid()) {
      if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return {};
      throw_errno("accept " + path_);
    }
    ucred credentials{};
    socklen_t size = sizeof credentials;
    if (::getsockopt(peer.get(), SOL_SOCKET, SO_PEERCRED, &credentials, &size) != 0) {
      throw_errno("SO_PEERCRED");
    }
    if (credentials.uid != ::geteuid()) {
      std::cerr << "hsm-bench-floor: refused a connection from uid " << credentials.uid << '\n';
      return {};
    }
    return peer;
  }

 private:
  std::string path_;
  FileDescriptor socket_;
  bool bound_ = false;
};

// ---- The server: the minimal sidecar ---------------------------------------------------------

/// Writes one line to stderr; lines from different threads do not interleave.
void log_line(const std::string& line) {
  static std::mutex mutex;
  const std::lock_guard lock(mutex);
  std::cerr << "hsm-bench-floor: " << line << '\n';
}

/// One accepted connection and the thread serving it, until the client closes it or stop().
/// Thread-safety: stop() and finished() from any thread; the destructor joins the thread.
class Connection {
 public:
  Connection(FileDescriptor socket, const Es256Token& token, std::uint64_t number)
      : socket_(std::move(socket)), thread_([this, &token, number] { serve(token, number); }) {}
  ~Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Connection(Connection&&) = delete;
  Connection& operator=(Connection&&) = delete;

  /// Wakes the thread (its read returns end-of-file) without closing the descriptor under it.
  void stop() noexcept { ::shutdown(socket_.get(), SHUT_RDWR); }
  [[nodiscard]] bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }

 private:
  void serve(const Es256Token& token, std::uint64_t number) noexcept {
    try {
      serve_requests(token, number);
    } catch (const std::exception& e) {
      log_line("connection " + std::to_string(number) + ": " + e.what());
    }
    // The client sees end-of-file now; the descriptor is closed when the accept loop reaps us.
    ::shutdown(socket_.get(), SHUT_RDWR);
    finished_.store(true, std::memory_order_release);
  }

  void serve_requests(const Es256Token& token, std::uint64_t number) {
    const int fd = socket_.get();
    unsigned char kind = 0;
    if (!read_exact(fd, {&kind, 1})) return;
    Request request{};
    if (kind == static_cast<unsigned char>(ConnectionKind::kPing)) {
      while (read_exact(fd, request) && write_all(fd, ping_reply(request))) {
      }
      return;
    }
    if (kind != static_cast<unsigned char>(ConnectionKind::kSign)) {
      throw std::runtime_error("unknown connection kind " + std::to_string(kind));
    }
    // Exactly what a direct thread does per signature, on this connection's own session.
    const std::unique_ptr<Session> session = token.open_session();
    std::array<CK_BYTE, kSignatureBufferBytes> signature{};
    static constexpr Reply kFailed{};
    std::uint64_t failures = 0;
    while (read_exact(fd, request)) {
      const std::optional<std::string> failure =
          sign_es256(*session, token.key(), request, signature);
      if (failure && failures++ == 0) {
        log_line("connection " + std::to_string(number) + ": " + *failure + " (first failure)");
      }
      const std::span<const unsigned char> reply =
          failure ? std::span<const unsigned char>(kFailed)
                  : std::span<const unsigned char>(signature).first(kEs256SignatureBytes);
      if (!write_all(fd, reply)) break;
    }
  }

  FileDescriptor socket_;
  std::atomic<bool> finished_{false};
  std::jthread thread_;  // declared last: started last, joined before the socket is closed
};

struct ServeOptions {
  TokenSettings token;
  std::string socket_path;
};

int serve(const ServeOptions& options) {
  // SIGTERM and SIGINT are blocked in every thread (threads inherit the mask, so this comes
  // first) and read from a signalfd by the accept loop: stopping then runs the destructors,
  // which close the sessions, finalise the module and remove the socket file.
  sigset_t stop_signals;
  ::sigemptyset(&stop_signals);
  ::sigaddset(&stop_signals, SIGTERM);
  ::sigaddset(&stop_signals, SIGINT);
  if (const int error = ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr); error != 0) {
    throw std::system_error(error, std::generic_category(), "pthread_sigmask");
  }
  const FileDescriptor signals(::signalfd(-1, &stop_signals, SFD_CLOEXEC));
  if (!signals.valid()) throw_errno("signalfd");

  const Es256Token token(options.token);
  UnixListener listener(options.socket_path);
  // The harness waits for this line: connections are accepted from now on.
  std::cout << "listening on " << listener.path() << std::endl;

  std::vector<std::unique_ptr<Connection>> connections;  // destroyed (joined) before the token
  std::uint64_t accepted = 0;
  for (;;) {
    std::array<pollfd, 2> ready = {{{listener.fd(), POLLIN, 0}, {signals.get(), POLLIN, 0}}};
    if (::poll(ready.data(), ready.size(), -1) < 0) {
      if (errno == EINTR) continue;
      throw_errno("poll");
    }
    if (ready[1].revents != 0) break;
    if (ready[0].revents == 0) continue;
    FileDescriptor peer = listener.accept();
    std::erase_if(connections, [](const auto& connection) { return connection->finished(); });
    if (peer.valid()) {
      connections.push_back(std::make_unique<Connection>(std::move(peer), token, ++accepted));
    }
  }
  for (const auto& connection : connections) connection->stop();
  connections.clear();
  return 0;
}

// ---- The client: the measurement -------------------------------------------------------------

struct ConnectOptions {
  std::string socket_path;
  bool ping = false;
  unsigned threads = 1;
  unsigned duration_ms = 5000;
  unsigned warmup_ms = 500;
  std::vector<int> server_pids;  // whose CPU time to report (the --serve process)
};

FileDescriptor connect_to(const std::string& path, ConnectionKind kind) {
  const sockaddr_un address = unix_address(path);
  FileDescriptor socket(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket.valid()) throw_errno("socket");
  if (::connect(socket.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    throw_errno("connect " + path);
  }
  const auto kind_byte = static_cast<unsigned char>(kind);
  if (!write_all(socket.get(), {&kind_byte, 1})) throw_errno("send to " + path);
  return socket;
}

/// One thread's loop: a request, its answer, again, until the window ends; samples the round
/// trips that complete inside it. A broken connection ends the thread's loop (one error).
void request_loop(int fd, ConnectionKind kind, const MeasurementWindow& window,
                  LatencyHistogram& latencies, ErrorLog& errors) {
  const Reply expected_ping = ping_reply(kBenchMessage);
  Reply reply{};
  for (Clock::time_point now = Clock::now(); now < window.end;) {
    const Clock::time_point started = now;
    if (!write_all(fd, kBenchMessage) || !read_exact(fd, reply)) {
      errors.record("the server connection: " + io_failure());
      return;
    }
    now = Clock::now();
    if (kind == ConnectionKind::kSign && is_sign_failure(reply)) {
      errors.record("the server could not sign (its stderr says why)");
    } else if (kind == ConnectionKind::kPing && reply != expected_ping) {
      errors.record("the server's answer to a ping is not the request twice");
    } else if (window.counts(now)) {
      latencies.record(now - started);
    }
  }
}

int measure(const ConnectOptions& options) {
  const ConnectionKind kind = options.ping ? ConnectionKind::kPing : ConnectionKind::kSign;
  std::vector<FileDescriptor> connections;
  for (unsigned i = 0; i < std::max(1U, options.threads); ++i) {
    connections.push_back(connect_to(options.socket_path, kind));
  }
  const auto latencies = histograms_for(connections.size());
  ErrorLog errors;
  const MeasurementWindow window = MeasurementWindow::starting_now(
      std::chrono::milliseconds(options.warmup_ms), std::chrono::milliseconds(options.duration_ms));
  const CpuSample cpu =
      run_in_threads(connections.size(), window, options.server_pids, [&](std::size_t i) {
        request_loop(connections[i].get(), kind, window, *latencies[i], errors);
      });

  auto report = finished_run_report(options.ping ? "uds_rtt" : "floor", connections.size(), window,
                                    errors, cpu, !options.server_pids.empty());
  report.settings = {{"socket", json_string(options.socket_path)},
                     {"threads", std::to_string(connections.size())}};
  return write_run_json(std::cout, std::move(report), latencies);
}

}  // namespace
}  // namespace hsm::bench

int main(int argc, char** argv) {
  hsm::bench::ServeOptions serve;
  serve.token.kid = "bench-es256";
  hsm::bench::ConnectOptions connect;
  CLI::App app{
      "hsm-bench-floor: the process-boundary floor, a minimal signing sidecar on a Unix socket "
      "(--serve) and its measurement (--connect)"};
  auto* serve_flag =
      app.add_option("--serve", serve.socket_path, "run the minimal sidecar on this socket path");
  auto* connect_flag = app.add_option("--connect", connect.socket_path,
                                      "measure signing (or --ping) through a --serve process");
  serve_flag->excludes(connect_flag);
  auto* module =
      app.add_option("--module", serve.token.module, "--serve: PKCS#11 module to dlopen");
  auto* pin_file =
      app.add_option("--pin-file", serve.token.pin_file, "--serve: file holding the user PIN");
  serve_flag->needs(module)->needs(pin_file);
  for (auto* option : {module, pin_file}) option->needs(serve_flag);
  app.add_option("--token-label", serve.token.token_label,
                 "--serve: token label (default: the first token)")
      ->needs(serve_flag);
  app.add_option("--kid", serve.token.kid, "--serve: CKA_LABEL of the ES256 private key")
      ->capture_default_str()
      ->needs(serve_flag);
  app.add_flag("--ping", connect.ping,
               "--connect: the bare round trip, without signing (mode uds_rtt)")
      ->needs(connect_flag);
  app.add_option("--threads", connect.threads, "--connect: threads, one connection each")
      ->capture_default_str()
      ->check(CLI::Range(1U, 4096U))
      ->needs(connect_flag);
  app.add_option("--duration-ms", connect.duration_ms, "--connect: measured time")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3'600'000U))
      ->needs(connect_flag);
  app.add_option("--warmup-ms", connect.warmup_ms,
                 "--connect: requests before the measurement starts")
      ->capture_default_str()
      ->needs(connect_flag);
  app.add_option("--server-pid", connect.server_pids,
                 "--connect: also report the CPU time of this process (the --serve one)")
      ->needs(connect_flag);
  CLI11_PARSE(app, argc, argv);
  if (serve.socket_path.empty() == connect.socket_path.empty()) {
    std::cerr << "hsm-bench-floor: give --serve SOCKET or --connect SOCKET\n" << app.help();
    return 2;
  }
  try {
    return serve.socket_path.empty() ? hsm::bench::measure(connect) : hsm::bench::serve(serve);
  } catch (const std::exception& e) {
    std::cerr << "hsm-bench-floor: " << e.what() << '\n';
    return 1;
  }
}
