// Hostile clients and signals against the real agent (issue 4). Each scenario checks three
// things: the agent survives with bounded memory (VmRSS from /proc), the hostile connection is
// dealt with (closed, paused or counted), and a well-behaved client keeps being served during and
// after. The signal scenarios check what every in-flight request sees: an answer (a result, or the
// error that says why not) or a clean end of its connection, never a silent loss or a hang.
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "fixtures/fault_module.hpp"
#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;
using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using namespace std::chrono_literals;

namespace {

// The agent's memory bound in every scenario. Generous (allocator slack, debug builds); issue 7
// tracks the tighter target of 32 MiB with 1,000 idle connections. Sanitizer runtimes add
// shadow memory and a quarantine of freed blocks, so their bound only proves "not unbounded".
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr std::size_t kRssBoundKib = 1024 * 1024;
#else
constexpr std::size_t kRssBoundKib = 64 * 1024;
#endif

using hsm::protocol::Request;
using hsm::protocol::Response;

// ---- The agent from outside: memory, metrics, fault module --------------------------------

// One series scraped now; -1 when /metrics does not answer.
double metric(const AgentProcess& agent, const std::string& series) {
  const auto [status, text] = agent.http_get("/metrics");
  return status == 200 ? metric_sample(text, series) : -1;
}

// The sum over every label set of a metric family, e.g. all reasons of a counter.
double metric_family_sum(const AgentProcess& agent, const std::string& name) {
  const auto [status, text] = agent.http_get("/metrics");
  std::istringstream lines(text);
  std::string line;
  double sum = 0;
  while (std::getline(lines, line)) {
    if (line.rfind(name + "{", 0) != 0) continue;
    const auto space = line.rfind(' ');
    if (space != std::string::npos) sum += std::stod(line.substr(space + 1));
  }
  return sum;
}

// Polls until `series` reaches at least `value` (at most `timeout`); returns the last value.
double wait_for_metric(const AgentProcess& agent, const std::string& series, double value,
                       std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  double now = metric(agent, series);
  while (now < value && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(50ms);
    now = metric(agent, series);
  }
  return now;
}

AgentOptions with_args(std::vector<std::string> args) {
  AgentOptions options;
  options.extra_args = std::move(args);
  return options;
}

// ---- Requests and answers ------------------------------------------------------------------

Request sign_request(std::uint32_t msgid, const std::string& kid, const std::string& data) {
  hsm::protocol::SignParams params;
  params.kid = kid;
  params.input = hsm::protocol::Data{to_bytes(data)};
  return {msgid, Method::kSign, params, std::nullopt};
}

Request capabilities_request(std::uint32_t msgid) {
  return {msgid, Method::kCapabilities, hsm::protocol::EmptyParams{}, std::nullopt};
}

std::string encode(const Request& request) {
  msgpack::sbuffer buffer;
  hsm::protocol::encode_request(request, buffer);
  return {buffer.data(), buffer.size()};
}

// The msgid of a response message [1, msgid, error, result], without decoding the rest.
std::optional<std::uint32_t> msgid_of(const msgpack::object& message) {
  if (message.type != msgpack::type::ARRAY || message.via.array.size != 4) return std::nullopt;
  const auto& id = message.via.array.ptr[1];
  if (id.type != msgpack::type::POSITIVE_INTEGER || id.via.u64 > UINT32_MAX) return std::nullopt;
  return static_cast<std::uint32_t>(id.via.u64);
}

// Whether `response` carries an ES256 signature over `data` by the key `spki`, checked with
// OpenSSL rather than trusted.
bool good_signature(const Response& response, const hsm::Bytes& spki, const std::string& data) {
  const auto* result = std::get_if<hsm::protocol::Result>(&response.body);
  if (result == nullptr) return false;
  const auto* signature = std::get_if<hsm::protocol::SignResult>(result);
  return signature != nullptr &&
         verify_with_spki(spki, "ES256", to_bytes(data), signature->signature);
}

std::optional<ErrorCode> error_code_of(const Response& response) {
  if (const auto* error = std::get_if<hsm::protocol::Error>(&response.body)) return error->code;
  return std::nullopt;
}

// A well-behaved client: a fresh connection, one sign, the signature checked with OpenSSL.
bool served(const AgentProcess& agent, const hsm::Bytes& spki, const std::string& kid,
            std::uint32_t tag) {
  try {
    RawConnection connection(agent.socket_path());
    const auto data = "served-" + std::to_string(tag);
    if (!connection.send(sign_request(1, kid, data))) return false;
    const auto response = connection.receive_response(Method::kSign, 15s);
    return response && response->msgid == 1 && good_signature(*response, spki, data);
  } catch (const std::exception&) {
    return false;
  }
}

// ---- Sockets from the hostile side -----------------------------------------------------------

// Raises this process's soft RLIMIT_NOFILE towards `wanted` (the agent, a child started later,
// inherits it). Returns the soft limit in force.
rlim_t raise_fd_limit(rlim_t wanted) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  if (limit.rlim_cur < wanted) {
    limit.rlim_cur = std::min(wanted, limit.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &limit);
    ::getrlimit(RLIMIT_NOFILE, &limit);
  }
  return limit.rlim_cur;
}

// Bounds a blocking send, so a test never hangs on an agent that stopped reading.
void set_send_timeout(int fd, std::chrono::seconds timeout) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(timeout.count());
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// True when the agent closed `fd` (or shut down its writing side) within `timeout`, seen without
// reading a byte: a client that never reads must still see its connection end.
bool peer_hung_up(int fd, std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    pollfd p{fd, POLLRDHUP, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    const int ready = ::poll(&p, 1, static_cast<int>(std::max<long>(left.count(), 0)));
    if (ready > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) return true;
    if (ready < 0 && errno != EINTR) return false;
    if (left.count() <= 0) return false;
  }
}

// How many of `connections` the agent has hung up on, right now.
std::size_t count_hung_up(const std::vector<std::unique_ptr<RawConnection>>& connections) {
  std::vector<pollfd> fds;
  fds.reserve(connections.size());
  for (const auto& connection : connections) fds.push_back({connection->fd(), POLLRDHUP, 0});
  if (::poll(fds.data(), fds.size(), 0) < 0) return 0;
  return static_cast<std::size_t>(std::count_if(fds.begin(), fds.end(), [](const pollfd& p) {
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
  }));
}

// ---- A client that never reads ---------------------------------------------------------------

// Room for the answers of NonReader::kRequests: far above the kernel's socket buffer, so the
// agent is left holding a write; far below this cap, so the cap does not close the connection.
constexpr std::size_t kRoomyWriteBuffer = 16 * 1024 * 1024;

// A connection that sends a burst of capabilities requests and never reads a byte. Once
// send_and_wait() returns, the agent has answered every request and holds part of the answers in
// a write that cannot finish (checked: fewer bytes reached our socket than were answered).
class NonReader {
 public:
  static constexpr std::uint32_t kRequests = 4000;

  explicit NonReader(const AgentProcess& agent) : agent_(agent), connection_(agent.socket_path()) {}

  void send_and_wait() {
    const std::size_t answer_bytes = capabilities_answer_bytes();
    REQUIRE(answer_bytes > 0);
    REQUIRE(kRequests * answer_bytes < kRoomyWriteBuffer);
    std::string burst;
    for (std::uint32_t id = 1; id <= kRequests; ++id) burst += encode(capabilities_request(id));
    REQUIRE(connection_.send(burst));
    const std::string answered = R"(hsm_agent_requests_total{code="ok",method="capabilities"})";
    REQUIRE(wait_for_metric(agent_, answered, kRequests + 1, 20s) >= kRequests + 1);
    int unread = 0;
    REQUIRE(::ioctl(connection_.fd(), FIONREAD, &unread) == 0);
    INFO("answers " << kRequests * answer_bytes << " bytes, in our socket " << unread);
    REQUIRE(static_cast<std::size_t>(unread) < kRequests * answer_bytes);
  }

  [[nodiscard]] int fd() const noexcept { return connection_.fd(); }

 private:
  // The size of one capabilities answer, from a connection of its own.
  std::size_t capabilities_answer_bytes() const {
    RawConnection probe(agent_.socket_path());
    if (!probe.send(capabilities_request(1))) return 0;
    const auto message = probe.receive(10s);
    if (!message) return 0;
    msgpack::sbuffer buffer;
    msgpack::pack(buffer, message->get());
    return buffer.size();
  }

  const AgentProcess& agent_;
  RawConnection connection_;
};

// ---- A pipelining signer that records how every request ended ---------------------------------

// One connection that keeps `window` signs outstanding until told to stop (or until the agent
// ends the stream), then collects what is still owed. run() on one thread; tally() after it.
class LoadClient {
 public:
  enum class End : std::uint8_t { kDrained, kEof, kReset, kTimeout, kMalformed };
  struct Tally {
    std::uint32_t sent = 0;
    std::uint32_t ok = 0;             // verified signatures
    std::uint32_t bad_signature = 0;  // a result that does not verify
    std::uint32_t unexpected = 0;     // unknown or repeated msgid, undecodable answer
    std::uint32_t unanswered = 0;     // outstanding when the stream ended
    std::map<ErrorCode, std::uint32_t> errors;
    End end = End::kDrained;
    bool partial_message = false;  // the stream ended inside a message
  };

  LoadClient(std::string socket_path, std::string kid, hsm::Bytes spki, std::uint32_t client_id,
             std::size_t window, std::chrono::milliseconds answer_timeout)
      : connection_(std::make_unique<RawConnection>(socket_path)),
        kid_(std::move(kid)),
        spki_(std::move(spki)),
        client_id_(client_id),
        window_(window),
        answer_timeout_(answer_timeout) {
    set_send_timeout(connection_->fd(), 10s);
  }

  void run(const std::atomic<bool>& stop) {
    constexpr std::uint32_t kMaxRequests = 200'000;
    std::uint32_t next = 1;
    bool can_send = true;
    for (;;) {
      while (can_send && !stop.load() && outstanding_.size() < window_ && next <= kMaxRequests) {
        if (!send_all(encode(sign_request(next, kid_, data_for(next))))) {
          can_send = false;  // the agent closed: read what it still sends, then its EOF
          break;
        }
        outstanding_.insert(next++);
        ++tally_.sent;
      }
      const bool done_sending = stop.load() || next > kMaxRequests;
      if (can_send && done_sending && outstanding_.empty()) break;  // End::kDrained
      if (!receive_one()) break;
    }
    tally_.unanswered = static_cast<std::uint32_t>(outstanding_.size());
  }

  /// After run() stopped with nothing outstanding (End::kDrained): waits for the stream's end,
  /// for a test whose agent has closed the connection meanwhile (the client, slower, may have
  /// been told to stop before it read the agent's EOF).
  void read_end_after_drain() {
    while (tally_.end == End::kDrained && receive_one()) {
    }
  }

  [[nodiscard]] const Tally& tally() const noexcept { return tally_; }
  /// Answers received so far; safe to read while run() is going.
  [[nodiscard]] std::uint32_t answered() const noexcept { return answered_.load(); }

 private:
  [[nodiscard]] std::string data_for(std::uint32_t msgid) const {
    return "load-" + std::to_string(client_id_) + "-" + std::to_string(msgid);
  }

  bool send_all(std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = ::send(connection_->fd(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
  }

  // Reads one answer and files it. False when the stream ended (tally_.end says how).
  bool receive_one() {
    for (;;) {
      std::optional<msgpack::object_handle> message;
      try {
        message = reader_.next();
      } catch (const hsm::protocol::FrameError&) {
        ++tally_.unexpected;
        tally_.end = End::kMalformed;  // the agent's bytes are not MessagePack
        return false;
      }
      if (message) {
        file_answer(message->get());
        return true;
      }
      pollfd p{connection_->fd(), POLLIN, 0};
      const int ready = ::poll(&p, 1, static_cast<int>(answer_timeout_.count()));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) {
        tally_.end = End::kTimeout;
        return false;
      }
      auto span = reader_.prepare(64 * 1024);
      const ssize_t n = ::recv(connection_->fd(), span.data(), span.size(), 0);
      if (n > 0) {
        reader_.commit(static_cast<std::size_t>(n));
        continue;
      }
      reader_.commit(0);
      if (n < 0 && errno == EINTR) continue;
      // ECONNRESET: the agent closed with requests of ours unread (it stopped reading to drain);
      // the kernel still delivered every byte it had written first.
      tally_.end = n == 0 ? End::kEof : End::kReset;
      tally_.partial_message = reader_.buffered_bytes() > 0;
      return false;
    }
  }

  void file_answer(const msgpack::object& message) {
    Response response;
    try {
      response = hsm::protocol::decode_response(message, Method::kSign);
    } catch (const std::exception&) {
      ++tally_.unexpected;
      return;
    }
    if (outstanding_.erase(response.msgid) == 0) {
      ++tally_.unexpected;  // never sent, or answered twice
      return;
    }
    answered_.fetch_add(1);
    if (const auto code = error_code_of(response)) {
      ++tally_.errors[*code];
    } else if (good_signature(response, spki_, data_for(response.msgid))) {
      ++tally_.ok;
    } else {
      ++tally_.bad_signature;
    }
  }

  std::unique_ptr<RawConnection> connection_;  // owns the socket; read here through fd()
  hsm::protocol::FrameReader reader_;
  std::string kid_;
  hsm::Bytes spki_;
  std::uint32_t client_id_;
  std::size_t window_;
  std::chrono::milliseconds answer_timeout_;
  std::set<std::uint32_t> outstanding_;
  Tally tally_;
  std::atomic<std::uint32_t> answered_{0};
};

// Starts `count` LoadClients on their own threads; join() waits for them.
struct Load {
  Load(const AgentProcess& agent, const std::string& kid, const hsm::Bytes& spki,
       std::uint32_t count, std::size_t window, std::chrono::milliseconds answer_timeout) {
    for (std::uint32_t i = 0; i < count; ++i) {
      clients.push_back(
          std::make_unique<LoadClient>(agent.socket_path(), kid, spki, i, window, answer_timeout));
    }
    for (auto& client : clients) {
      threads.emplace_back([this, raw = client.get()] { raw->run(stop); });
    }
  }
  ~Load() { join(); }
  Load(const Load&) = delete;
  Load& operator=(const Load&) = delete;

  void join() {
    stop = true;
    for (auto& thread : threads) {
      if (thread.joinable()) thread.join();
    }
  }
  // Waits until every client has at least `each` more answers than `before` (from answered()),
  // at most `timeout`: the load is really flowing through the agent, whatever the machine's load.
  [[nodiscard]] bool wait_until_answered(std::uint32_t each, std::chrono::milliseconds timeout,
                                         const std::vector<std::uint32_t>& before = {}) const {
    const auto until = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      bool all = true;
      for (std::size_t i = 0; i < clients.size(); ++i) {
        const std::uint32_t base = i < before.size() ? before[i] : 0;
        if (clients[i]->answered() < base + each) all = false;
      }
      if (all) return true;
      if (std::chrono::steady_clock::now() >= until) return false;
      std::this_thread::sleep_for(20ms);
    }
  }
  [[nodiscard]] std::vector<std::uint32_t> answered() const {
    std::vector<std::uint32_t> counts;
    for (const auto& client : clients) counts.push_back(client->answered());
    return counts;
  }
  [[nodiscard]] std::uint32_t total_ok() const {
    std::uint32_t ok = 0;
    for (const auto& client : clients) ok += client->tally().ok;
    return ok;
  }
  [[nodiscard]] std::uint32_t total_errors(ErrorCode code) const {
    std::uint32_t count = 0;
    for (const auto& client : clients) {
      const auto it = client->tally().errors.find(code);
      if (it != client->tally().errors.end()) count += it->second;
    }
    return count;
  }

  std::atomic<bool> stop{false};
  std::vector<std::unique_ptr<LoadClient>> clients;
  std::vector<std::thread> threads;
};

// ---- Clients of the metrics port -------------------------------------------------------------

// What a client that stalls sends: the start of a request whose headers never end.
constexpr std::string_view kHalfHttpRequest = "GET /healthz HTTP/1.1\r\nHost: x\r\n";

// The loopback address of hostile peer `i` (127.0.0.2, 127.0.0.3, ...): all of 127.0.0.0/8 is
// this machine, so a test can stand for many peers while its probes come from 127.0.0.1.
std::string hostile_peer(int i) {
  return "127.0.0." + std::to_string(2 + i);
}

// Keeps `count` TCP connections open on the agent's metrics port, each from its own peer address,
// every other one having sent half a request and the rest nothing. Like an attacker, it opens a
// connection again whenever the agent closes one, so that `count` stay open for as long as the
// object lives.
class StalledHttpClients {
 public:
  StalledHttpClients(int port, int count) : port_(port) {
    for (int i = 0; i < count; ++i) connections_.push_back(open(i));
    thread_ = std::thread([this] { keep_open(); });
  }
  ~StalledHttpClients() {
    stop_ = true;
    thread_.join();
  }
  StalledHttpClients(const StalledHttpClients&) = delete;
  StalledHttpClients& operator=(const StalledHttpClients&) = delete;

  /// How many times the agent closed one of them (and it was opened again).
  [[nodiscard]] int reopened() const noexcept { return reopened_.load(); }

 private:
  std::unique_ptr<RawConnection> open(int i) const {
    auto connection = std::make_unique<RawConnection>(RawConnection::tcp(port_, hostile_peer(i)));
    if (i % 2 == 1) (void)connection->send(kHalfHttpRequest);
    return connection;
  }

  void keep_open() {
    while (!stop_) {
      std::vector<pollfd> fds;
      for (const auto& connection : connections_) fds.push_back({connection->fd(), POLLRDHUP, 0});
      if (::poll(fds.data(), fds.size(), 20) <= 0) continue;
      for (std::size_t i = 0; i < fds.size(); ++i) {
        if ((fds[i].revents & (POLLRDHUP | POLLHUP | POLLERR)) == 0) continue;
        try {
          connections_[i] = open(static_cast<int>(i));
          ++reopened_;
        } catch (const std::runtime_error&) {
          // refused for now: the next round tries again
        }
      }
    }
  }

  const int port_;
  std::vector<std::unique_ptr<RawConnection>> connections_;  // thread_'s, once it runs
  std::atomic<bool> stop_{false};
  std::atomic<int> reopened_{0};
  std::thread thread_;
};

// One GET and how long its answer took.
struct TimedAnswer {
  int status = 0;
  std::chrono::milliseconds took{};
};
TimedAnswer timed_get(int port, const std::string& path, const std::string& source = "127.0.0.1") {
  const auto started = std::chrono::steady_clock::now();
  const int status = http_get(port, path, source, 2s).first;
  return {status, std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - started)};
}

const char* to_string(LoadClient::End end) {
  switch (end) {
    case LoadClient::End::kDrained:
      return "drained";
    case LoadClient::End::kEof:
      return "eof";
    case LoadClient::End::kReset:
      return "reset";
    case LoadClient::End::kTimeout:
      return "timeout";
    case LoadClient::End::kMalformed:
      return "malformed";
  }
  return "?";
}

}  // namespace

// ---- Hostile clients ---------------------------------------------------------------------------

TEST_CASE(
    "thousands of connections at once: the excess is closed and counted, the agent stays "
    "small and keeps serving",
    "[hostile]") {
  constexpr std::size_t kMaxConnections = 1000;
  constexpr std::size_t kAttempts = 2000;
  // The test holds kAttempts sockets; the agent (a child) up to kMaxConnections plus its own.
  const rlim_t fd_limit = raise_fd_limit(kAttempts + 512);
  if (fd_limit < kAttempts + 512) {
    WARN("RLIMIT_NOFILE hard limit " << fd_limit << " is too low for " << kAttempts
                                     << " connections; scenario not run");
    return;
  }
  // One uid (root) opens them all: lift the per-uid cap, which is another test's subject.
  RunningAgent env(with_args({"--max-connections", std::to_string(kMaxConnections),
                              "--max-connections-per-uid", std::to_string(kMaxConnections)}));
  env.client.generate_key("k");  // the well-behaved client holds one admitted connection
  const auto spki = env.client.get_public_key("k").spki;
  const std::string rejected_series =
      R"(hsm_agent_connections_rejected_total{reason="max_connections"})";
  const double rejected_before = metric(env.agent, rejected_series);
  const std::size_t rss_start = resident_kib(env.agent.pid());

  std::vector<std::unique_ptr<RawConnection>> flood;
  flood.reserve(kAttempts);
  std::uint32_t served_during = 0, probes_during = 0;
  for (std::size_t i = 0; i < kAttempts; ++i) {
    flood.push_back(std::make_unique<RawConnection>(env.agent.socket_path()));
    if (i % 200 == 199) {
      ++probes_during;
      const auto data = "during-" + std::to_string(i);
      if (verify_with_spki(spki, "ES256", to_bytes(data), env.client.sign("k", data))) {
        ++served_during;
      }
    }
  }
  CHECK(served_during == probes_during);

  // Everything beyond the limit is closed at accept; admitted connections stay open (no idle
  // timeout here), so hung-up sockets and the rejection counter settle on the same number.
  const std::size_t must_reject = kAttempts - (kMaxConnections - 1);
  std::size_t hung_up = 0;
  double rejected = 0;
  const auto until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until) {
    hung_up = count_hung_up(flood);
    rejected = metric(env.agent, rejected_series) - rejected_before;
    if (hung_up >= must_reject && static_cast<double>(hung_up) == rejected) break;
    std::this_thread::sleep_for(100ms);
  }
  CHECK(hung_up >= must_reject);
  CHECK(static_cast<double>(hung_up) == rejected);
  CHECK(metric(env.agent, "hsm_agent_connections_open") == static_cast<double>(kMaxConnections));
  CHECK(env.agent.stderr_text().find("connection refused (max_connections)") != std::string::npos);

  // ~1,000 idle connections open: the agent's memory.
  const std::size_t rss_full = resident_kib(env.agent.pid());
  WARN("agent VmRSS: " << rss_start << " KiB before, " << rss_full << " KiB with "
                       << kMaxConnections << " idle connections open");
  CHECK(rss_full > 0);
  CHECK(rss_full < kRssBoundKib);

  const auto after = to_bytes("after the flood");
  CHECK(verify_with_spki(spki, "ES256", after, env.client.sign("k", after)));

  // Once the flood leaves, new clients are admitted again (the agent notices the closes
  // asynchronously, so a few early attempts may still meet the limit).
  flood.clear();
  bool admitted_again = false;
  for (std::uint32_t attempt = 0; attempt < 100 && !admitted_again; ++attempt) {
    admitted_again = served(env.agent, spki, "k", attempt);
    if (!admitted_again) std::this_thread::sleep_for(100ms);
  }
  CHECK(admitted_again);
  CHECK(env.agent.running());
}

TEST_CASE(
    "slowloris: bytes that never complete a message are no activity: tricklers are closed at "
    "the read timeout, a silent connection at the idle timeout, others are served",
    "[hostile]") {
  // Issue 15: a uid trickling one byte every 2 s held every connection slot, because any byte
  // counted as activity. Now only complete messages do, and a message must complete within
  // --read-timeout of its first byte.
  constexpr int kIdleTimeoutSeconds = 3;
  constexpr int kReadTimeoutSeconds = 2;
  RunningAgent env(with_args({"--idle-timeout", std::to_string(kIdleTimeoutSeconds),
                              "--read-timeout", std::to_string(kReadTimeoutSeconds)}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;
  const std::string read_timeouts = R"(hsm_agent_connections_closed_total{reason="read_timeout"})";

  constexpr std::size_t kSlowClients = 5;
  std::vector<std::unique_ptr<RawConnection>> slow;
  std::vector<std::string> requests;
  for (std::uint32_t i = 0; i < kSlowClients; ++i) {
    slow.push_back(std::make_unique<RawConnection>(env.agent.socket_path()));
    requests.push_back(encode(capabilities_request(100 + i)));
  }
  RawConnection silent(env.agent.socket_path());
  // A byte every 500 ms: the idle timeout alone would never see it idle for long under the old
  // rule, and the request (~20 bytes) would take ~10 s to complete.
  const auto start = std::chrono::steady_clock::now();
  std::array<std::optional<std::chrono::steady_clock::duration>, kSlowClients> closed_after{};
  std::uint32_t served_count = 0, probes = 0;
  for (std::size_t byte = 0; byte < 12; ++byte) {
    for (std::size_t i = 0; i < kSlowClients; ++i) {
      if (closed_after[i]) continue;
      if (peer_hung_up(slow[i]->fd(), 0ms)) {
        closed_after[i] = std::chrono::steady_clock::now() - start;
        continue;
      }
      REQUIRE(byte < requests[i].size());
      (void)slow[i]->send(std::string_view(requests[i]).substr(byte, 1));
    }
    ++probes;
    if (served(env.agent, spki, "k", static_cast<std::uint32_t>(byte))) ++served_count;
    std::this_thread::sleep_until(start + (byte + 1) * 500ms);
  }
  CHECK(served_count == probes);
  for (std::size_t i = 0; i < kSlowClients; ++i) {
    INFO("slow client " << i);
    REQUIRE(closed_after[i].has_value());
    // The read timeout plus the sweep's one-second tick, and a loaded machine's slack.
    CHECK(*closed_after[i] >= std::chrono::seconds(kReadTimeoutSeconds));
    CHECK(*closed_after[i] <= std::chrono::seconds(kReadTimeoutSeconds + 2));
  }
  CHECK(wait_for_metric(env.agent, read_timeouts, kSlowClients, 5s) == kSlowClients);
  // Silent from the start: closed at the idle timeout (no message ever arrived).
  CHECK(peer_hung_up(silent.fd(), 10s));
  CHECK(metric(env.agent, R"(hsm_agent_connections_closed_total{reason="idle_timeout"})") >= 1);

  // A slow client that does complete its message within the read timeout is served.
  RawConnection patient(env.agent.socket_path());
  const auto request = encode(capabilities_request(42));
  for (std::size_t byte = 0; byte < request.size(); ++byte) {
    REQUIRE(patient.send(std::string_view(request).substr(byte, 1)));
    std::this_thread::sleep_for(20ms);
  }
  const auto response = patient.receive_response(Method::kCapabilities, 10s);
  REQUIRE(response);
  CHECK(response->msgid == 42);
  CHECK(served(env.agent, spki, "k", 1000));
  CHECK(resident_kib(env.agent.pid()) < kRssBoundKib);
}

TEST_CASE(
    "memory: 2 connections pipelining 256 signs of 1 MiB each to a slow token stay within the "
    "budget, every sign is answered, and RSS comes back",
    "[hostile][memory]") {
  // Issue 15: this took the agent to 537 MB, which stayed after the connections closed. Now the
  // decoded requests count against --max-buffered-bytes (64 MiB by default): past it the agent
  // stops reading these connections until answers free room.
  constexpr std::size_t kMiB = 1024 * 1024;
  constexpr std::size_t kBudget = 64 * kMiB;
  constexpr std::uint32_t kPerConnection = 256;
  FaultModule faults;
  // The slowest token: every sign hangs until the test has pushed all it can; then it signs.
  RunningAgent env(faults.agent_options(
      {"--sessions", "2", "--max-sessions", "2", "--request-timeout", "120000"}));
  env.client.generate_key("k");
  faults.set("C_Sign hang=1\n");
  const std::size_t rss_start = resident_kib(env.agent.pid());

  const std::string data(kMiB - 512, 'd');
  std::array<std::unique_ptr<RawConnection>, 2> connections;
  std::array<std::atomic<std::uint32_t>, 2> signed_ok{}, failed{};
  std::atomic<int> readers_done{0};
  std::vector<std::thread> threads;
  for (std::size_t c = 0; c < connections.size(); ++c) {
    connections[c] = std::make_unique<RawConnection>(env.agent.socket_path());
    set_send_timeout(connections[c]->fd(), 60s);
    threads.emplace_back([&, c] {  // the writer: all 256 at once, as fast as the agent reads
      for (std::uint32_t id = 1; id <= kPerConnection; ++id) {
        if (!connections[c]->send(sign_request(id, "k", data))) return;
      }
    });
    threads.emplace_back([&, c] {  // the reader
      for (std::uint32_t i = 0; i < kPerConnection; ++i) {
        const auto response = connections[c]->receive_response(Method::kSign, 60s);
        if (!response) break;
        ++(error_code_of(*response) ? failed[c] : signed_ok[c]);
      }
      ++readers_done;
    });
  }
  // The agent reads until the budget is spent, then stops reading: the writers block.
  std::size_t peak_rss = 0;
  double peak_held = 0;
  const auto filled = [&] {
    peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
    peak_held = std::max(peak_held, metric(env.agent, "hsm_agent_buffered_bytes"));
    return metric(env.agent, "hsm_agent_memory_budget_waits_total") >= 1 &&
           peak_held >= static_cast<double>(kBudget - 2 * kMiB);
  };
  CHECK(wait_until(filled, 30s));
  std::this_thread::sleep_for(1500ms);  // and holds no more, however long it waits
  (void)filled();                       // sampled again: checked against the budget below
  faults.set("");                       // the token signs again: everything pushed gets its answer
  while (readers_done.load() < 2) {
    peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
    std::this_thread::sleep_for(50ms);
  }
  for (auto& thread : threads) thread.join();
  CHECK(signed_ok[0].load() == kPerConnection);
  CHECK(signed_ok[1].load() == kPerConnection);
  CHECK(failed[0].load() + failed[1].load() == 0);
  WARN("agent VmRSS " << rss_start << " KiB at start, " << peak_rss << " KiB at the peak; "
                      << peak_held / kMiB << " MiB held at most by the budget's count");
  CHECK(peak_held <= static_cast<double>(kBudget + 4 * 24 * 1024));
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // docs/reliability.md, "Memory": at most twice what the budget admits, over the start.
  CHECK(peak_rss <= rss_start + 2 * kBudget / 1024 + 4 * 1024);
  // Back to within 32 MiB of the start: the fault this guards against kept 537 MB. One
  // fresh-clone CI run of three ended 26 MiB over (from a 16 MiB start, an 84 MiB peak); the
  // rest came back within 20. Why it sometimes keeps more is not yet known (see the issue 16
  // note of 2026-12-07); the bound is the fault's, not a figure to tune to.
  std::size_t rss_after = 0;
  CHECK(wait_until(
      [&] {
        rss_after = resident_kib(env.agent.pid());
        return rss_after <= rss_start + 32 * 1024;
      },
      10s));
  WARN("agent VmRSS after: " << rss_after << " KiB");
#endif
  CHECK(env.agent.running());
}

TEST_CASE(
    "clients that never read their answers are closed at the write-buffer cap, memory "
    "stays bounded, others are served",
    "[hostile][concurrency]") {
  constexpr std::size_t kWriteBufferBytes = 64 * 1024;
  RunningAgent env(with_args({"--max-write-buffer", std::to_string(kWriteBufferBytes),
                              "--max-inflight-per-connection", "8"}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;

  // Two flood capabilities (answered on the loop), two flood signs (through the workers); none
  // reads a byte. Each sends at most kBatches x kBatch requests.
  constexpr std::uint32_t kHostile = 4, kBatches = 400, kBatch = 500;
  struct Outcome {
    bool send_failed = false;  // the agent closed while we were still writing
    bool hung_up = false;      // and the socket shows it
    std::uint32_t batches_sent = 0;
  };
  std::array<Outcome, kHostile> outcomes{};
  std::vector<std::unique_ptr<RawConnection>> hostile;
  for (std::uint32_t h = 0; h < kHostile; ++h) {
    hostile.push_back(std::make_unique<RawConnection>(env.agent.socket_path()));
    set_send_timeout(hostile.back()->fd(), 10s);
  }
  std::atomic<std::uint32_t> running{kHostile};
  std::vector<std::thread> threads;
  for (std::uint32_t h = 0; h < kHostile; ++h) {
    threads.emplace_back([&, h] {
      const bool signs = h % 2 == 1;
      std::uint32_t msgid = 1;
      for (std::uint32_t b = 0; b < kBatches && !outcomes[h].send_failed; ++b) {
        std::string batch;
        for (std::uint32_t i = 0; i < kBatch; ++i, ++msgid) {
          batch += encode(signs ? sign_request(msgid, "k", "x") : capabilities_request(msgid));
        }
        if (hostile[h]->send(batch)) {
          ++outcomes[h].batches_sent;
        } else {
          outcomes[h].send_failed = true;
        }
      }
      outcomes[h].hung_up = peer_hung_up(hostile[h]->fd(), 15s);
      --running;
    });
  }

  // Meanwhile a well-behaved client is served, and the agent's memory is watched.
  std::size_t peak_rss = 0;
  std::uint32_t probes = 0, served_count = 0;
  for (std::uint32_t i = 0; i < 300 && running.load() > 0; ++i) {
    ++probes;
    if (served(env.agent, spki, "k", i)) ++served_count;
    peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
  }
  for (auto& thread : threads) thread.join();
  CHECK(served_count == probes);

  for (std::uint32_t h = 0; h < kHostile; ++h) {
    INFO("hostile client " << h << " sent " << outcomes[h].batches_sent << " batches");
    CHECK(outcomes[h].hung_up);
    CHECK(outcomes[h].send_failed);  // closed long before it ran out of requests to send
  }
  // Each was closed for the write-buffer cap, and counted as such.
  CHECK(metric(env.agent, R"(hsm_agent_connections_closed_total{reason="slow_reader"})") ==
        kHostile);
  CHECK(env.agent.stderr_text().find("does not read its answers") != std::string::npos);
  peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
  WARN("agent peak VmRSS with " << kHostile << " non-reading clients: " << peak_rss << " KiB");
  CHECK(peak_rss < kRssBoundKib);
  CHECK(served(env.agent, spki, "k", 10'000));
  CHECK(env.agent.running());
}

TEST_CASE("a client that never reads and then falls silent is closed at the idle timeout",
          "[hostile]") {
  // The agent holds a write to this client that cannot finish; idle sweeping must still close
  // the connection (and free what it holds) rather than wait for the write forever.
  RunningAgent env(
      with_args({"--idle-timeout", "2", "--max-write-buffer", std::to_string(kRoomyWriteBuffer)}));
  NonReader quiet(env.agent);
  quiet.send_and_wait();
  CHECK(peer_hung_up(quiet.fd(), 15s));
  CHECK(metric(env.agent, "hsm_agent_connections_open") == 0);
  CHECK(env.agent.running());
}

TEST_CASE(
    "a flood of pipelined requests on one connection: all answered once, backpressure "
    "bounds the work in flight, memory stays bounded",
    "[hostile][concurrency]") {
  constexpr std::size_t kMaxInflight = 4;
  // A roomy write buffer: this client reads, but may fall behind the agent's writes for a while
  // (sanitizer builds); being closed as a slow reader is another test's subject.
  RunningAgent env(with_args({"--max-inflight-per-connection", std::to_string(kMaxInflight),
                              "--max-write-buffer", std::to_string(kRoomyWriteBuffer)}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;

  // Every fourth request a sign (workers, counted in flight), the rest capabilities (answered
  // on the loop at once). Written as fast as possible while this thread reads.
  constexpr std::uint32_t kCount = 20'000, kChunk = 256;
  const auto is_sign = [](std::uint32_t msgid) { return msgid % 4 == 0; };
  const auto data_for = [](std::uint32_t msgid) { return "flood-" + std::to_string(msgid); };
  RawConnection connection(env.agent.socket_path());
  set_send_timeout(connection.fd(), 20s);
  std::atomic<bool> write_failed{false};
  std::thread writer([&] {
    for (std::uint32_t first = 1; first <= kCount; first += kChunk) {
      std::string chunk;
      for (std::uint32_t id = first; id < std::min(first + kChunk, kCount + 1); ++id) {
        chunk +=
            encode(is_sign(id) ? sign_request(id, "k", data_for(id)) : capabilities_request(id));
      }
      if (!connection.send(chunk)) {
        write_failed = true;
        return;
      }
    }
  });

  // Backpressure, checked from the answers' order: the agent dispatches capabilities request j
  // only while it reads the connection, i.e. while fewer than kMaxInflight signs are in flight,
  // and answers leave in the order they were produced. So when the answer to j arrives, at most
  // kMaxInflight - 1 signs sent before j can still be unanswered.
  std::vector<bool> seen(kCount + 1, false);
  std::uint32_t answers = 0, duplicates = 0, failures = 0, bad_signatures = 0;
  std::uint32_t frontier = 0;        // the last capabilities answer seen
  std::size_t unanswered_signs = 0;  // signs below the frontier not answered yet
  std::size_t most_unanswered = 0;
  std::size_t peak_rss = 0;
  while (answers < kCount) {
    auto message = connection.receive(30s);
    if (!message) break;
    const auto msgid = msgid_of(message->get());
    if (!msgid || *msgid == 0 || *msgid > kCount || seen[*msgid]) {
      ++duplicates;
      continue;
    }
    seen[*msgid] = true;
    ++answers;
    const Response response = hsm::protocol::decode_response(
        message->get(), is_sign(*msgid) ? Method::kSign : Method::kCapabilities);
    if (error_code_of(response)) {
      ++failures;
    } else if (is_sign(*msgid) && !good_signature(response, spki, data_for(*msgid))) {
      ++bad_signatures;
    }
    if (is_sign(*msgid)) {
      if (*msgid < frontier) --unanswered_signs;
    } else {
      for (std::uint32_t id = frontier + 1; id < *msgid; ++id) {
        if (is_sign(id) && !seen[id]) ++unanswered_signs;
      }
      frontier = std::max(frontier, *msgid);
      most_unanswered = std::max(most_unanswered, unanswered_signs);
    }
    if (answers % 2000 == 0) peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
  }
  writer.join();
  CHECK_FALSE(write_failed);
  CHECK(answers == kCount);
  CHECK(duplicates == 0);
  CHECK(failures == 0);
  CHECK(bad_signatures == 0);
  CHECK(most_unanswered < kMaxInflight);
  peak_rss = std::max(peak_rss, resident_kib(env.agent.pid()));
  WARN("agent peak VmRSS during a " << kCount << "-request pipelined flood: " << peak_rss
                                    << " KiB");
  CHECK(peak_rss < kRssBoundKib);
  CHECK(served(env.agent, spki, "k", 1));
}

TEST_CASE("random bytes from several connections: each closed, the agent alive, others served",
          "[hostile]") {
  RunningAgent env(with_args({"--idle-timeout", "2"}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;
  const std::string protocol_errors = "hsm_agent_protocol_errors_total";
  const double errors_before = metric_family_sum(env.agent, protocol_errors);

  // Seeded: a failure replays exactly. Bytes that happen to start a long valid prefix leave the
  // connection waiting for more; the idle timeout ends those.
  constexpr std::uint32_t kConnections = 16;
  std::vector<std::unique_ptr<RawConnection>> garbage;
  for (std::uint32_t c = 0; c < kConnections; ++c) {
    std::mt19937 random(0x5eed0000U + c);
    std::uniform_int_distribution<std::size_t> length(1, 64 * 1024);
    std::uniform_int_distribution<int> byte(0, 255);
    std::string bytes(length(random), '\0');
    for (auto& b : bytes) b = static_cast<char>(byte(random));
    garbage.push_back(std::make_unique<RawConnection>(env.agent.socket_path()));
    set_send_timeout(garbage.back()->fd(), 10s);
    (void)garbage.back()->send(bytes);  // may fail: the agent can close before the end
    CHECK(served(env.agent, spki, "k", c));
  }
  for (std::uint32_t c = 0; c < kConnections; ++c) {
    INFO("garbage connection " << c);
    CHECK(garbage[c]->closed_by_peer(15s));
  }
  CHECK(env.agent.running());
  CHECK(metric_family_sum(env.agent, protocol_errors) > errors_before);
  CHECK(served(env.agent, spki, "k", 100));
  CHECK(resident_kib(env.agent.pid()) < kRssBoundKib);
}

// ---- Signals -------------------------------------------------------------------------------

TEST_CASE(
    "SIGSTOP then SIGCONT under load: every request answered, what waited past its "
    "deadline while stopped is answered deadline_exceeded and not run",
    "[signals][concurrency]") {
  // The expectation: a request's deadline runs from when the agent read it. One read before the
  // stop whose deadline passed while stopped is answered deadline_exceeded and never reaches the
  // token; one already inside the token finishes (its answer may be either); bytes still in the
  // socket when the agent stopped are read after SIGCONT with a fresh deadline and served.
  // Slow signatures (20 ms, two sessions) keep a queue in front of the workers, so when the
  // agent is stopped for longer than the deadline some requests are certainly still waiting.
  FaultModule faults;
  faults.set("C_Sign delay_ms=20\n");
  constexpr std::uint32_t kSessions = 2;
  RunningAgent env(faults.agent_options({"--sessions", std::to_string(kSessions), "--max-sessions",
                                         std::to_string(kSessions), "--request-timeout", "3000"}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;
  std::this_thread::sleep_for(200ms);  // the stats file catches up with start-up calls
  const auto signs_before = faults.stats()["C_Sign"];

  Load load(env.agent, "k", spki, 4, 8, 30s);
  REQUIRE(load.wait_until_answered(8, 30s));  // the load flows, a queue waits on the workers
  env.agent.signal(SIGSTOP);
  std::this_thread::sleep_for(4s);  // longer than --request-timeout: the stop itself is the test
  env.agent.signal(SIGCONT);
  CHECK(load.wait_until_answered(16, 30s, load.answered()));  // serving again after the stop
  load.join();

  for (const auto& client : load.clients) {
    const auto& tally = client->tally();
    INFO("sent " << tally.sent << ", ok " << tally.ok << ", end " << to_string(tally.end));
    CHECK(tally.end == LoadClient::End::kDrained);  // every answer came; no connection lost
    CHECK(tally.unanswered == 0);
    CHECK(tally.unexpected == 0);
    CHECK(tally.bad_signature == 0);
    for (const auto& [code, count] : tally.errors) {
      INFO(hsm::protocol::to_string(code) << " x" << count);
      CHECK(code == ErrorCode::kDeadlineExceeded);
    }
  }
  const auto ok = load.total_ok();
  const auto expired = load.total_errors(ErrorCode::kDeadlineExceeded);
  CHECK(ok > 0);
  CHECK(expired > 0);  // the queue at the stop outlived its deadlines
  CHECK(env.agent.running());
  CHECK(served(env.agent, spki, "k", 1));

  // Expired requests were dropped, not run: C_Sign was called for the successes, plus at most
  // one call per worker that was already inside the token when the agent stopped. Exact counts
  // once the agent's C_Finalize has run.
  const auto status = env.agent.stop(20s);
  CHECK(status.exited);
  const auto signs = faults.stats()["C_Sign"] - signs_before;
  INFO("C_Sign calls " << signs << ", ok answers " << ok << ", deadline_exceeded " << expired);
  CHECK(signs >= ok + 1);  // the `served` probe above
  CHECK(signs <= ok + 1 + kSessions);
}

TEST_CASE(
    "SIGTERM under load: every request answered or its connection closed cleanly, socket "
    "removed, exit 0 within the drain deadline",
    "[signals][concurrency]") {
  constexpr int kShutdownSeconds = 5;
  RunningAgent env(with_args({"--shutdown-timeout", std::to_string(kShutdownSeconds)}));
  env.client.generate_key("k");
  const auto spki = env.client.get_public_key("k").spki;

  Load load(env.agent, "k", spki, 6, 8, 30s);
  // Only once every client is being served: signalled earlier, some requests may not have been
  // read at all, and nothing would be in flight.
  REQUIRE(load.wait_until_answered(1, 30s));
  env.agent.signal(SIGTERM);
  const auto status = env.agent.wait_exit(std::chrono::seconds(kShutdownSeconds + 10));
  load.join();

  REQUIRE(status);
  CHECK(status->exited);
  CHECK(status->code == 0);
  CHECK_FALSE(std::filesystem::exists(env.agent.socket_path()));
  for (const auto& client : load.clients) {
    client->read_end_after_drain();
    const auto& tally = client->tally();
    INFO("sent " << tally.sent << ", ok " << tally.ok << ", unanswered " << tally.unanswered
                 << ", end " << to_string(tally.end));
    // The stream ended by the agent's close, after whole messages only.
    CHECK((tally.end == LoadClient::End::kEof || tally.end == LoadClient::End::kReset));
    CHECK_FALSE(tally.partial_message);
    CHECK(tally.unexpected == 0);
    CHECK(tally.bad_signature == 0);
    for (const auto& [code, count] : tally.errors) {
      INFO(hsm::protocol::to_string(code) << " x" << count);
      CHECK(code == ErrorCode::kShuttingDown);
    }
  }
  CHECK(load.total_ok() >= load.clients.size());  // each had an answer before the signal
  CHECK(env.agent.stderr_text().find("SIGTERM") != std::string::npos);
}

TEST_CASE(
    "SIGTERM with a hung C_Sign: the drain deadline answers it shutting_down and the agent "
    "exits 0",
    "[signals]") {
  FaultModule faults;
  constexpr int kShutdownSeconds = 2;
  RunningAgent env(
      faults.agent_options({"--sessions", "2", "--max-sessions", "2", "--request-timeout", "120000",
                            "--shutdown-timeout", std::to_string(kShutdownSeconds)}));
  env.client.generate_key("k");
  faults.set("C_Sign hang=1\n");  // after start-up: nothing before this signs
  RawConnection connection(env.agent.socket_path());
  REQUIRE(connection.send(sign_request(1, "k", "hung")));
  REQUIRE(faults.wait_for("C_Sign.injected", 1, 10s));

  env.agent.signal(SIGTERM);
  const auto response = connection.receive_response(Method::kSign, 15s);
  REQUIRE(response);
  CHECK(error_code_of(*response) == ErrorCode::kShuttingDown);
  CHECK(connection.closed_by_peer(5s));
  const auto status = env.agent.wait_exit(std::chrono::seconds(kShutdownSeconds + 10));
  REQUIRE(status);
  CHECK(status->exited);
  CHECK(status->code == 0);
  CHECK_FALSE(std::filesystem::exists(env.agent.socket_path()));
}

TEST_CASE("a second SIGTERM during a long drain exits at once", "[signals]") {
  FaultModule faults;
  RunningAgent env(
      faults.agent_options({"--sessions", "2", "--max-sessions", "2", "--request-timeout", "120000",
                            "--shutdown-timeout", "60"}));
  env.client.generate_key("k");
  faults.set("C_Sign hang=1\n");
  RawConnection connection(env.agent.socket_path());
  REQUIRE(connection.send(sign_request(1, "k", "hung")));
  REQUIRE(faults.wait_for("C_Sign.injected", 1, 10s));

  env.agent.signal(SIGTERM);
  // Draining: the socket goes (no new clients meanwhile), and the hung call keeps the agent
  // busy for up to 60 s.
  const auto until = std::chrono::steady_clock::now() + 15s;
  while (std::filesystem::exists(env.agent.socket_path()) &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(20ms);
  }
  CHECK_FALSE(std::filesystem::exists(env.agent.socket_path()));
  REQUIRE_FALSE(env.agent.wait_exit(500ms).has_value());
  env.agent.signal(SIGTERM);
  const auto status = env.agent.wait_exit(5s);
  REQUIRE(status);
  CHECK(status->exited);  // its own exit, not killed by the signal
  CHECK(connection.closed_by_peer(5s));
  CHECK(env.agent.stderr_text().find("second termination signal") != std::string::npos);
}

TEST_CASE(
    "SIGTERM with a client that never reads its answers still exits within the drain "
    "deadline",
    "[signals][hostile]") {
  // The agent holds a write to this client that cannot finish; shutdown must not wait on it.
  constexpr int kShutdownSeconds = 2;
  RunningAgent env(with_args({"--shutdown-timeout", std::to_string(kShutdownSeconds),
                              "--max-write-buffer", std::to_string(kRoomyWriteBuffer)}));
  NonReader quiet(env.agent);
  quiet.send_and_wait();

  env.agent.signal(SIGTERM);
  const auto status = env.agent.wait_exit(std::chrono::seconds(kShutdownSeconds + 10));
  REQUIRE(status);
  CHECK(status->exited);
  CHECK(status->code == 0);
  CHECK_FALSE(std::filesystem::exists(env.agent.socket_path()));
}

// ---- The metrics port (issue 15, item 2) --------------------------------------------------------

TEST_CASE(
    "64 idle or half-sent HTTP connections cannot starve /healthz and /readyz: 20 probes in a "
    "row each answered within 200 ms",
    "[hostile][http]") {
  RunningAgent env;
  const int port = env.agent.metrics_port();
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));

  StalledHttpClients stalled(port, 64);
  std::chrono::milliseconds slowest{};
  for (int i = 0; i < 20; ++i) {
    const auto answer = timed_get(port, "/healthz");
    INFO("probe " << i << ": status " << answer.status << " after " << answer.took.count()
                  << " ms");
    CHECK(answer.status == 200);
    CHECK(answer.took <= 200ms);
    slowest = std::max(slowest, answer.took);
    // Spread over more than the 1 s header deadline: the probes also meet connections that the
    // agent has just closed and the attacker has opened again.
    std::this_thread::sleep_for(60ms);
  }
  const auto ready = timed_get(port, "/readyz");
  CHECK(ready.status == 200);
  CHECK(ready.took <= 200ms);
  INFO("slowest probe " << slowest.count() << " ms; stalled connections reopened "
                        << stalled.reopened() << " times");
  // The agent closed stalled connections meanwhile (the header deadline), and they came back.
  CHECK(stalled.reopened() >= 1);
  CHECK(env.agent.running());
}

TEST_CASE(
    "an HTTP connection that sends nothing, or trickles its headers, is closed at the 1 s "
    "header deadline without an answer",
    "[hostile][http]") {
  RunningAgent env;
  const int port = env.agent.metrics_port();
  constexpr auto kLimit = 3s;  // the deadline is 1 s; room for a loaded machine

  SECTION("silent") {
    auto connection = RawConnection::tcp(port, hostile_peer(0));
    const auto started = std::chrono::steady_clock::now();
    const auto bytes = connection.read_to_end(kLimit);
    INFO("closed after " << std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::steady_clock::now() - started)
                                .count()
                         << " ms");
    REQUIRE(bytes.has_value());  // EOF within the limit
    CHECK(bytes->empty());       // no answer to a request never made
  }
  SECTION("a header byte every 100 ms (activity does not extend the deadline)") {
    auto connection = RawConnection::tcp(port, hostile_peer(0));
    REQUIRE(connection.send(kHalfHttpRequest));
    const auto started = std::chrono::steady_clock::now();
    std::optional<std::string> bytes;
    while (!bytes && std::chrono::steady_clock::now() - started < kLimit) {
      (void)connection.send("X");  // fails once the agent has closed: then EOF below
      bytes = connection.read_to_end(100ms);
    }
    INFO("closed after " << std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::steady_clock::now() - started)
                                .count()
                         << " ms");
    REQUIRE(bytes.has_value());
    CHECK(bytes->rfind("HTTP/1.1 200", 0) == std::string::npos);  // never answered
  }
  CHECK(env.agent.http_get("/healthz").first == 200);
}

TEST_CASE(
    "HTTP connections per peer address: 8 held, the rest closed at once; that address is "
    "served again once they end, other addresses all along",
    "[hostile][http]") {
  RunningAgent env;
  const int port = env.agent.metrics_port();
  REQUIRE(wait_until([&] { return env.agent.http_get("/readyz").first == 200; }));

  // 64 silent connections from the probes' own address, 127.0.0.1.
  std::vector<std::unique_ptr<RawConnection>> same_peer;
  for (int i = 0; i < 64; ++i) {
    same_peer.push_back(std::make_unique<RawConnection>(RawConnection::tcp(port, "127.0.0.1")));
  }
  // That address holds its 8 connections: a probe from it is closed unanswered (documented in
  // docs/security.md)...
  CHECK(timed_get(port, "/healthz", "127.0.0.1").status == 0);
  // ...while a probe from any other address is answered.
  const auto other = timed_get(port, "/healthz", hostile_peer(0));
  CHECK(other.status == 200);
  CHECK(other.took <= 200ms);

  // Exactly 8 of the 64 were kept: they answer a request, the others were closed at accept.
  int answered = 0;
  int closed = 0;
  for (auto& connection : same_peer) {
    (void)connection->send("GET /healthz HTTP/1.0\r\n\r\n");  // fails on a closed one
    const auto bytes = connection->read_to_end(5s);
    REQUIRE(bytes.has_value());
    if (bytes->rfind("HTTP/1.1 200", 0) == 0) {
      ++answered;
    } else if (bytes->empty()) {
      ++closed;
    }
  }
  CHECK(answered == 8);
  CHECK(closed == 56);
  // Their answers ended them: the address is served again.
  const auto again = timed_get(port, "/healthz", "127.0.0.1");
  CHECK(again.status == 200);
  CHECK(again.took <= 200ms);
}

TEST_CASE(
    "the metrics port bounds what a request may be: oversized headers 431, a body never read, "
    "other methods 405, unknown paths 404; every answer no-store and closing",
    "[hostile][http]") {
  RunningAgent env;
  const int port = env.agent.metrics_port();
  // One exchange on a fresh connection: everything the agent sends until it closes.
  const auto exchange = [&](const std::string& request) {
    auto connection = RawConnection::tcp(port);
    (void)connection.send(request);
    return connection.read_to_end(5s).value_or("(not closed)");
  };

  const std::string big_header(20 * 1024, 'a');
  CHECK(exchange("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + big_header + "\r\n\r\n")
            .rfind("HTTP/1.1 431", 0) == 0);
  // A body announced but never sent: the answer does not wait for it.
  const auto post =
      exchange("POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
  CHECK(post.rfind("HTTP/1.1 405", 0) == 0);
  CHECK(post.find("\r\nAllow: GET\r\n") != std::string::npos);
  const auto unknown = exchange("GET /admin HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(unknown.rfind("HTTP/1.1 404", 0) == 0);
  for (const auto* path : {"/healthz", "/readyz", "/metrics"}) {
    const auto answer = exchange(std::string("GET ") + path + " HTTP/1.1\r\nHost: x\r\n\r\n");
    INFO(path);
    CHECK(answer.find("\r\nCache-Control: no-store\r\n") != std::string::npos);
    CHECK(answer.find("\r\nConnection: close\r\n") != std::string::npos);
  }
  CHECK(env.agent.http_get("/healthz").first == 200);
}
