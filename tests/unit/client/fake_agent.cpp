#include "fake_agent.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace hsm::test {
namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error("fake agent: " + what + ": " + std::strerror(errno));
}

protocol::Bytes signed_bytes(const protocol::SignInput& input) {
  const auto bytes = protocol::input_bytes(input);
  return protocol::Bytes(bytes.begin(), bytes.end());
}

protocol::Jwk test_jwk(const std::string& kid) {
  return {{"kty", "EC"}, {"crv", "P-256"}, {"x", "eA"},   {"y", "eQ"},
          {"kid", kid},  {"alg", "ES256"}, {"use", "sig"}};
}

}  // namespace

// ---- FakeConnection -------------------------------------------------------------------------

FakeConnection::~FakeConnection() {
  ::close(fd_);
}

void FakeConnection::answer(const protocol::Response& response) {
  msgpack::sbuffer buffer;
  protocol::encode_response(response, buffer);
  send_raw(std::string(buffer.data(), buffer.size()));
}

void FakeConnection::answer_result(std::uint32_t msgid, protocol::Result result) {
  answer(protocol::Response{msgid, std::move(result)});
}

void FakeConnection::answer_error(std::uint32_t msgid, protocol::ErrorCode code,
                                  std::string message, std::optional<std::string> ckr) {
  answer(protocol::Response{msgid, protocol::Error{code, std::move(message), std::move(ckr)}});
}

void FakeConnection::send_raw(const std::string& bytes) {
  std::lock_guard lock(write_mutex_);
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return;  // the client went away: nothing to answer
    }
    sent += static_cast<std::size_t>(n);
  }
}

void FakeConnection::close() {
  ::shutdown(fd_, SHUT_RDWR);
}

// ---- Default answers ------------------------------------------------------------------------

protocol::Result default_result(const protocol::Request& request) {
  using protocol::Method;
  switch (request.method) {
    case Method::kCapabilities:
      return protocol::CapabilitiesResult{1,    "fake-1.0", true,    false,
                                          true, {"ES256"},  "ES256", 1024 * 1024};
    case Method::kHealth:
      return protocol::HealthResult{true, 0.25, std::nullopt, {"token", "maker", "model", "42"}};
    case Method::kGenerateKey: {
      const auto& params = std::get<protocol::GenerateKeyParams>(request.params);
      return protocol::KeyDescription{params.kid, params.alg.value_or("ES256"),
                                      test_jwk(params.kid)};
    }
    case Method::kSign: {
      const auto& params = std::get<protocol::SignParams>(request.params);
      return protocol::SignResult{params.kid, params.alg.value_or("ES256"),
                                  signed_bytes(params.input)};
    }
    case Method::kVerify: {
      const auto& params = std::get<protocol::VerifyParams>(request.params);
      return protocol::VerifyResult{params.signature == signed_bytes(params.input)};
    }
    case Method::kGetPublicKey: {
      const auto& params = std::get<protocol::KidParams>(request.params);
      return protocol::PublicKeyResult{params.kid, "ES256", test_jwk(params.kid),
                                       protocol::Bytes{0x30, 0x03, 0x02, 0x01, 0x00}};
    }
    case Method::kListKeys:
      return protocol::ListKeysResult{
          {{"a", "ES256", test_jwk("a")}, {"b", "ES256", test_jwk("b")}}};
    case Method::kDeleteKey: {
      const auto& params = std::get<protocol::KidParams>(request.params);
      return protocol::DeleteKeyResult{params.kid == "present"};
    }
    case Method::kGetJwks:
      return protocol::JwksResult{{test_jwk("a"), test_jwk("b")}};
    case Method::kImportKey:
    case Method::kSignBatch:
      break;
  }
  throw std::logic_error("fake agent: no default answer for this method");
}

Handler answer_everything() {
  return [](const std::shared_ptr<FakeConnection>& connection, const protocol::Request& request) {
    connection->answer_result(request.msgid, default_result(request));
  };
}

// ---- FakeAgent ------------------------------------------------------------------------------

FakeAgent::FakeAgent(Handler handler) : handler_(std::move(handler)) {
  std::string pattern = "/tmp/hsm-client-test-XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) {
    fail("mkdtemp");
  }
  directory_ = pattern;
  socket_path_ = directory_ + "/agent.sock";
  start();
}

FakeAgent::~FakeAgent() {
  stop();
  ::rmdir(directory_.c_str());
}

void FakeAgent::start() {
  std::lock_guard lock(mutex_);
  if (listen_fd_ >= 0) {
    return;
  }
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    fail("socket");
  }
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::memcpy(address.sun_path, socket_path_.c_str(), socket_path_.size() + 1);
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): the sockets API
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    fail("bind");
  }
  if (::listen(fd, 64) != 0) {
    fail("listen");
  }
  listen_fd_ = fd;
  accept_thread_ = std::thread([this, fd] { accept_loop(fd); });
}

void FakeAgent::stop() {
  std::thread accept_thread;
  std::vector<std::thread> threads;
  int listen_fd = -1;
  {
    std::lock_guard lock(mutex_);
    listen_fd = std::exchange(listen_fd_, -1);
    if (listen_fd >= 0) {
      ::shutdown(listen_fd, SHUT_RDWR);  // wakes accept()
    }
    for (auto& connection : connections_) {
      connection->close();
    }
    accept_thread = std::move(accept_thread_);
    threads.swap(connection_threads_);
  }
  if (accept_thread.joinable()) {
    accept_thread.join();
  }
  for (auto& thread : threads) {
    thread.join();
  }
  {
    std::lock_guard lock(mutex_);
    connections_.clear();
  }
  if (listen_fd >= 0) {
    ::close(listen_fd);
    ::unlink(socket_path_.c_str());
  }
}

void FakeAgent::accept_loop(int listen_fd) {
  for (;;) {
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) {
        continue;
      }
      return;  // stop() shut the listener down
    }
    auto connection = std::make_shared<FakeConnection>(fd);
    std::lock_guard lock(mutex_);
    if (listen_fd_ != listen_fd) {  // stopping: refuse
      connection->close();
      continue;
    }
    ++accepted_;
    connections_.push_back(connection);
    connection_threads_.emplace_back([this, connection] { serve(connection); });
  }
}

void FakeAgent::serve(std::shared_ptr<FakeConnection> connection) {
  protocol::FrameReader reader;
  try {
    for (;;) {
      auto space = reader.prepare(4096);
      const ssize_t n = ::recv(connection->fd(), space.data(), space.size(), 0);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        return;
      }
      reader.commit(static_cast<std::size_t>(n));
      while (auto message = reader.next()) {
        auto decoded = protocol::decode_request(message->get());
        if (auto* bad = std::get_if<protocol::RequestDecodeError>(&decoded)) {
          if (!bad->msgid) {
            return;
          }
          connection->answer(protocol::Response{*bad->msgid, bad->error});
          continue;
        }
        const auto& request = std::get<protocol::Request>(decoded);
        {
          std::lock_guard lock(mutex_);
          requests_.push_back(request);
        }
        handler_(connection, request);
      }
    }
  } catch (const std::exception&) {
    connection->close();  // garbage from the client: hang up, as the agent does
  }
}

std::vector<protocol::Request> FakeAgent::requests() const {
  std::lock_guard lock(mutex_);
  return requests_;
}

std::size_t FakeAgent::count(protocol::Method method) const {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  for (const auto& request : requests_) {
    n += request.method == method ? 1 : 0;
  }
  return n;
}

}  // namespace hsm::test
