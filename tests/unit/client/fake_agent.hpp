// A stand-in for hsm-agent's transport: a Unix socket in a temporary directory that speaks the
// wire protocol through hsm::protocol's codec, and lets each test decide how (and whether) to
// answer. It never touches PKCS#11; the real agent is exercised by the integration tests.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hsm/protocol/codec.hpp"
#include "hsm/protocol/types.hpp"

namespace hsm::test {

/// One accepted connection. Thread-safe: a test may answer from any thread, at any time.
class FakeConnection {
 public:
  explicit FakeConnection(int fd) : fd_(fd) {}
  ~FakeConnection();
  FakeConnection(const FakeConnection&) = delete;
  FakeConnection& operator=(const FakeConnection&) = delete;

  void answer(const protocol::Response& response);
  void answer_result(std::uint32_t msgid, protocol::Result result);
  void answer_error(std::uint32_t msgid, protocol::ErrorCode code, std::string message,
                    std::optional<std::string> ckr = {});
  void send_raw(const std::string& bytes);
  /// Shuts the socket down (the client sees the agent hang up).
  void close();
  [[nodiscard]] int fd() const noexcept { return fd_; }

 private:
  std::mutex write_mutex_;
  int fd_;
};

/// Called on the connection's thread for every decoded request.
using Handler =
    std::function<void(const std::shared_ptr<FakeConnection>&, const protocol::Request&)>;

/// The answer a healthy agent would give: sign returns the signed bytes themselves as the
/// "signature" (so a test can tell whose answer it got), verify says valid when the signature
/// equals the data, and so on.
[[nodiscard]] protocol::Result default_result(const protocol::Request& request);
/// A handler that answers every request at once with default_result().
[[nodiscard]] Handler answer_everything();

class FakeAgent {
 public:
  explicit FakeAgent(Handler handler = answer_everything());
  ~FakeAgent();
  FakeAgent(const FakeAgent&) = delete;
  FakeAgent& operator=(const FakeAgent&) = delete;

  [[nodiscard]] const std::string& socket_path() const noexcept { return socket_path_; }
  /// The agent goes away: the listener and every connection close, the socket file is removed.
  void stop();
  /// Listens again on the same path (an agent restart).
  void start();

  [[nodiscard]] int connections_accepted() const noexcept { return accepted_.load(); }
  /// Every request received so far, in arrival order.
  [[nodiscard]] std::vector<protocol::Request> requests() const;
  [[nodiscard]] std::size_t count(protocol::Method method) const;

 private:
  void accept_loop(int listen_fd);
  void serve(std::shared_ptr<FakeConnection> connection);

  Handler handler_;
  std::string directory_;
  std::string socket_path_;
  std::atomic<int> accepted_{0};

  mutable std::mutex mutex_;
  int listen_fd_ = -1;
  std::thread accept_thread_;
  std::vector<std::shared_ptr<FakeConnection>> connections_;
  std::vector<std::thread> connection_threads_;
  std::vector<protocol::Request> requests_;
};

}  // namespace hsm::test
