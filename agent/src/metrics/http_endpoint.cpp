#include "metrics/http_endpoint.hpp"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <optional>
#include <stop_token>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace hsm::agent {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";

// "HOST:PORT" to the address to bind: HOST an IPv4 address, an IPv6 address in brackets or a
// name (its first address). Throws std::runtime_error saying what is wrong.
sockaddr_storage listen_address(const std::string& listen) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == listen.size()) {
    throw std::runtime_error("not HOST:PORT");
  }
  std::string host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  const std::string_view port_text = std::string_view(listen).substr(colon + 1);
  std::uint16_t port = 0;
  const auto [end, error] =
      std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (error != std::errc() || end != port_text.data() + port_text.size()) {
    throw std::runtime_error("port '" + std::string(port_text) + "' is not a number 0-65535");
  }

  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found); rc != 0) {
    throw std::runtime_error("cannot resolve '" + host + "': " + ::gai_strerror(rc));
  }
  const std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owned(found, &::freeaddrinfo);
  sockaddr_storage address{};
  if (found->ai_family == AF_INET) {
    std::memcpy(&address, found->ai_addr, sizeof(sockaddr_in));
    reinterpret_cast<sockaddr_in*>(&address)->sin_port = htons(port);
  } else if (found->ai_family == AF_INET6) {
    std::memcpy(&address, found->ai_addr, sizeof(sockaddr_in6));
    reinterpret_cast<sockaddr_in6*>(&address)->sin6_port = htons(port);
  } else {
    throw std::runtime_error("'" + host + "' is neither an IPv4 nor an IPv6 address");
  }
  return address;
}

std::uint16_t port_of(const sockaddr_storage& address) {
  return ntohs(address.ss_family == AF_INET6
                   ? reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port
                   : reinterpret_cast<const sockaddr_in*>(&address)->sin_port);
}

// An eventfd that wakes the serving thread's poll; owns the descriptor.
class Wakeup {
 public:
  Wakeup() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  }
  ~Wakeup() { ::close(fd_); }
  Wakeup(const Wakeup&) = delete;
  Wakeup& operator=(const Wakeup&) = delete;

  void signal() const noexcept {
    const std::uint64_t one = 1;
    (void)!::write(fd_, &one, sizeof(one));
  }
  [[nodiscard]] int fd() const noexcept { return fd_; }

 private:
  int fd_;
};

struct DaemonStop {
  void operator()(MHD_Daemon* daemon) const noexcept { MHD_stop_daemon(daemon); }
};
struct ResponseDestroy {
  void operator()(MHD_Response* response) const noexcept { MHD_destroy_response(response); }
};

struct Answer {
  unsigned status;
  std::string_view content_type;
  std::string body;
  bool negotiated = false;  // the encoding follows Accept-Encoding: Vary says so
  bool gzip = false;        // body is gzip-compressed: sent with Content-Encoding: gzip
};

struct DeflateEnd {
  void operator()(z_stream* stream) const noexcept { deflateEnd(stream); }
};

// `text` as a gzip member (RFC 1952), by zlib: windowBits 15 + 16 asks deflate for the gzip
// header and trailer. Throws std::runtime_error if zlib fails (it does not, short of memory).
std::string gzip(std::string_view text) {
  z_stream stream{};
  if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    throw std::runtime_error("deflateInit2 failed");
  }
  const std::unique_ptr<z_stream, DeflateEnd> owned(&stream);
  std::string out(deflateBound(&stream, static_cast<uLong>(text.size())), '\0');
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data()));
  stream.avail_in = static_cast<uInt>(text.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  // deflateBound() is enough for one Z_FINISH call.
  if (deflate(&stream, Z_FINISH) != Z_STREAM_END) throw std::runtime_error("deflate failed");
  out.resize(stream.total_out);
  return out;
}

// Whether an Accept-Encoding value (RFC 9110, 12.5.3) accepts gzip: a "gzip" (or "x-gzip")
// coding, or "*", whose weight is not zero. Without the header, identity only.
bool accepts_gzip(std::string_view header) {
  const auto trim = [](std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
  };
  const auto iequals = [](std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
             return std::tolower(static_cast<unsigned char>(x)) ==
                    std::tolower(static_cast<unsigned char>(y));
           });
  };
  while (!header.empty()) {
    const auto comma = header.find(',');
    std::string_view item = header.substr(0, comma);
    header = comma == std::string_view::npos ? std::string_view() : header.substr(comma + 1);
    const auto semicolon = item.find(';');
    const std::string_view coding = trim(item.substr(0, semicolon));
    if (!iequals(coding, "gzip") && !iequals(coding, "x-gzip") && coding != "*") continue;
    if (semicolon == std::string_view::npos) return true;
    // The weight: "q=0", "q=0.0", "q=0.000" refuse; any other value accepts.
    const std::string_view weight = trim(item.substr(semicolon + 1));
    if (weight.size() < 2 || std::tolower(static_cast<unsigned char>(weight[0])) != 'q' ||
        weight[1] != '=') {
      return true;
    }
    const std::string_view value = trim(weight.substr(2));
    const bool zero = !value.empty() && value.find_first_not_of("0.") == std::string_view::npos;
    if (!zero) return true;
  }
  return false;
}

MHD_Result queue_answer(MHD_Connection* connection, const Answer& answer) {
  const std::unique_ptr<MHD_Response, ResponseDestroy> response(MHD_create_response_from_buffer(
      answer.body.size(), const_cast<char*>(answer.body.data()), MHD_RESPMEM_MUST_COPY));
  if (!response) return MHD_NO;
  const std::string content_type(answer.content_type);
  if (MHD_add_response_header(response.get(), MHD_HTTP_HEADER_CONTENT_TYPE, content_type.c_str()) !=
          MHD_YES ||
      MHD_add_response_header(response.get(), MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") !=
          MHD_YES ||
      // One request per connection: the header deadline runs from accept, and a client cannot
      // keep a connection by asking again.
      MHD_add_response_header(response.get(), MHD_HTTP_HEADER_CONNECTION, "close") != MHD_YES) {
    return MHD_NO;
  }
  if (answer.negotiated &&
      MHD_add_response_header(response.get(), MHD_HTTP_HEADER_VARY, "Accept-Encoding") != MHD_YES) {
    return MHD_NO;
  }
  if (answer.gzip && MHD_add_response_header(response.get(), MHD_HTTP_HEADER_CONTENT_ENCODING,
                                             "gzip") != MHD_YES) {
    return MHD_NO;
  }
  if (answer.status == MHD_HTTP_METHOD_NOT_ALLOWED &&
      MHD_add_response_header(response.get(), MHD_HTTP_HEADER_ALLOW, "GET") != MHD_YES) {
    return MHD_NO;
  }
  return MHD_queue_response(connection, answer.status, response.get());
}

}  // namespace

// The daemon, run by hand on one thread: poll on libmicrohttpd's epoll descriptor and on a
// wake-up, then MHD_run, then close the connections whose headers are late. libmicrohttpd's own
// connection timeout is reset by every byte received, so the header deadline is kept here.
class HttpEndpoint::Server {
 public:
  Server(const std::string& listen, std::shared_ptr<prometheus::Registry> registry,
         const HealthState& health, std::shared_ptr<prometheus::Collectable> extra)
      : registry_(std::move(registry)), extra_(std::move(extra)), health_(health) {
    sockaddr_storage& address = address_;
    address = listen_address(listen);
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (address.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    // No MHD_OPTION_LISTENING_ADDRESS_REUSE: without it libmicrohttpd sets SO_REUSEADDR (and
    // not SO_REUSEPORT, which would let a second agent share the port).
    // The logger first: libmicrohttpd reports on the options after it through it.
    daemon_.reset(MHD_start_daemon(
        flags, port_of(address), nullptr, nullptr, &Server::on_request, this,
        MHD_OPTION_EXTERNAL_LOGGER, &Server::on_log, this, MHD_OPTION_SOCK_ADDR,
        reinterpret_cast<sockaddr*>(&address), MHD_OPTION_CONNECTION_LIMIT, kMaxConnections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, kMaxConnectionsPerPeer, MHD_OPTION_CONNECTION_TIMEOUT,
        kStallTimeoutSeconds, MHD_OPTION_CONNECTION_MEMORY_LIMIT, kConnectionMemory,
        MHD_OPTION_NOTIFY_CONNECTION, &Server::on_connection, this, MHD_OPTION_END));
    if (!daemon_) {
      throw std::runtime_error(start_error_.empty() ? "libmicrohttpd did not start" : start_error_);
    }
    const auto* epoll = MHD_get_daemon_info(daemon_.get(), MHD_DAEMON_INFO_EPOLL_FD);
    if (epoll == nullptr) throw std::runtime_error("libmicrohttpd has no epoll descriptor");
    epoll_fd_ = epoll->epoll_fd;
    started_ = true;
    thread_ = std::jthread([this](const std::stop_token& stop) { serve(stop); });
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  [[nodiscard]] int port() const {
    const auto* info = MHD_get_daemon_info(daemon_.get(), MHD_DAEMON_INFO_BIND_PORT);
    return info == nullptr ? 0 : info->port;
  }

  [[nodiscard]] std::string metrics_url() const {
    sockaddr_storage address = address_;
    std::string host;
    if (address.ss_family == AF_INET6) {
      auto& in6 = reinterpret_cast<sockaddr_in6&>(address);
      if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) in6.sin6_addr = in6addr_loopback;
    } else {
      auto& in4 = reinterpret_cast<sockaddr_in&>(address);
      if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    }
    std::array<char, NI_MAXHOST> text{};
    if (::getnameinfo(reinterpret_cast<const sockaddr*>(&address),
                      address.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in),
                      text.data(), text.size(), nullptr, 0, NI_NUMERICHOST) != 0) {
      throw std::runtime_error("cannot format the metrics address");
    }
    host = text.data();
    if (address.ss_family == AF_INET6) host = "[" + host + "]";
    return "http://" + host + ":" + std::to_string(port()) + "/metrics";
  }

 private:
  void serve(const std::stop_token& stop) {
    const std::stop_callback wake_on_stop(stop, [this] { wake_.signal(); });
    std::array<pollfd, 2> fds{pollfd{epoll_fd_, POLLIN, 0}, pollfd{wake_.fd(), POLLIN, 0}};
    while (!stop.stop_requested()) {
      int timeout_ms = -1;  // nothing to time: wait for a connection
      MHD_UNSIGNED_LONG_LONG daemon_ms = 0;
      if (MHD_get_timeout(daemon_.get(), &daemon_ms) == MHD_YES) {
        timeout_ms = static_cast<int>(std::min<MHD_UNSIGNED_LONG_LONG>(daemon_ms, 60'000));
      }
      if (const auto next = close_late_requests()) {
        const int ms = static_cast<int>(next->count());
        timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
      }
      if (::poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) {
        spdlog::error("metrics endpoint: poll failed: {}", std::strerror(errno));
        return;
      }
      (void)MHD_run(daemon_.get());
    }
  }

  // Ends every connection whose request headers have not arrived by their deadline, by shutting
  // its socket down: libmicrohttpd sees the end on its next turn and closes it. Returns the time
  // until the next deadline, nullopt when no connection waits for its request.
  std::optional<std::chrono::milliseconds> close_late_requests() {
    const auto now = Clock::now();
    std::optional<std::chrono::milliseconds> next;
    for (auto it = awaiting_request_.begin(); it != awaiting_request_.end();) {
      if (it->second <= now) {
        const auto* info = MHD_get_connection_info(it->first, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (info != nullptr) ::shutdown(info->connect_fd, SHUT_RDWR);
        spdlog::debug("metrics endpoint: closed a connection whose request headers were late");
        it = awaiting_request_.erase(it);
        continue;
      }
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(it->second - now);
      next = next ? std::min(*next, left) : left;
      ++it;
    }
    return next;
  }

  Answer answer(std::string_view url, std::string_view method, bool gzip_accepted) const {
    if (method != MHD_HTTP_METHOD_GET) {
      return {MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", "only GET\n"};
    }
    if (url == "/metrics") {
      auto families = registry_->Collect();
      if (extra_) {
        auto more = extra_->Collect();
        families.insert(families.end(), std::make_move_iterator(more.begin()),
                        std::make_move_iterator(more.end()));
      }
      std::string text = prometheus::TextSerializer().Serialize(families);
      if (gzip_accepted) return {MHD_HTTP_OK, kMetricsContentType, gzip(text), true, true};
      return {MHD_HTTP_OK, kMetricsContentType, std::move(text), true};
    }
    if (url == "/healthz") {
      if (health_.loop_alive(HealthState::kMaxLoopSilence))
        return {MHD_HTTP_OK, "text/plain", "ok\n"};
      return {MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", "event loop not responding\n"};
    }
    if (url == "/readyz") {
      if (const auto reason = health_.not_ready_reason()) {
        return {MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", *reason + "\n"};
      }
      if (const auto note = health_.readiness_note()) {
        return {MHD_HTTP_OK, "text/plain", "ready; " + *note + "\n"};
      }
      return {MHD_HTTP_OK, "text/plain", "ready\n"};
    }
    return {MHD_HTTP_NOT_FOUND, "text/plain", "not found\n"};
  }

  // libmicrohttpd calls this once the request headers are in (and again for each piece of a
  // body). The answer goes out at once; a body is never read: the answer closes the connection.
  static MHD_Result on_request(void* cls, MHD_Connection* connection, const char* url,
                               const char* method, const char* /*version*/,
                               const char* /*upload_data*/, std::size_t* upload_data_size,
                               void** request_state) noexcept {
    auto& self = *static_cast<Server*>(cls);
    if (*request_state != nullptr) {  // body bytes after the answer was queued: dropped
      *upload_data_size = 0;
      return MHD_YES;
    }
    *request_state = &self;
    self.awaiting_request_.erase(connection);
    try {
      const char* encodings =
          MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT_ENCODING);
      const bool gzip_accepted = encodings != nullptr && accepts_gzip(encodings);
      return queue_answer(connection, self.answer(url, method, gzip_accepted));
    } catch (const std::exception& e) {
      spdlog::error("metrics endpoint: {} {}: {}", method, url, e.what());
      return MHD_NO;  // closes the connection
    }
  }

  static void on_connection(void* cls, MHD_Connection* connection, void** /*socket_context*/,
                            MHD_ConnectionNotificationCode code) noexcept {
    auto& self = *static_cast<Server*>(cls);
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
      try {
        self.awaiting_request_.emplace(connection, Clock::now() + kHeaderTimeout);
      } catch (const std::bad_alloc&) {
        // Not tracked: libmicrohttpd's own stall timeout still ends it.
      }
    } else {
      self.awaiting_request_.erase(connection);
    }
  }

  // libmicrohttpd's messages: while starting, the reason it could not (for the exception);
  // afterwards, debug lines (a refused connection is one: never more than a debug line each).
  static void on_log(void* cls, const char* format, va_list arguments) noexcept {
    auto& self = *static_cast<Server*>(cls);
    std::array<char, 512> text{};
    const int length = std::vsnprintf(text.data(), text.size(), format, arguments);
    if (length <= 0) return;
    std::string_view line(text.data(), std::min(static_cast<std::size_t>(length), text.size() - 1));
    while (!line.empty() && (line.back() == '\n' || line.back() == '.')) line.remove_suffix(1);
    if (!self.started_) {
      try {
        if (!self.start_error_.empty()) self.start_error_ += "; ";
        self.start_error_ += line;
      } catch (const std::bad_alloc&) {
      }
      return;
    }
    spdlog::debug("metrics endpoint: {}", line);
  }

  const std::shared_ptr<prometheus::Registry> registry_;
  const std::shared_ptr<prometheus::Collectable> extra_;
  sockaddr_storage address_{};  // the address bound (its port as asked: 0 for any)
  const HealthState& health_;
  bool started_ = false;     // set before the serving thread starts
  std::string start_error_;  // libmicrohttpd's messages while starting
  // Connections still waiting for their request headers, with their deadline. Used on the
  // serving thread only (and by MHD_stop_daemon, after it has ended).
  std::unordered_map<MHD_Connection*, Clock::time_point> awaiting_request_;
  Wakeup wake_;
  std::unique_ptr<MHD_Daemon, DaemonStop> daemon_;  // stopped after the thread ended
  int epoll_fd_ = -1;                               // daemon_'s, which owns it
  std::jthread thread_;  // last: started once everything above exists, stopped first
};

HttpEndpoint::HttpEndpoint(const std::string& listen,
                           std::shared_ptr<prometheus::Registry> registry,
                           const HealthState& health,
                           std::shared_ptr<prometheus::Collectable> extra) {
  try {
    server_ = std::make_unique<Server>(listen, std::move(registry), health, std::move(extra));
  } catch (const std::runtime_error& e) {
    throw std::runtime_error("cannot listen for metrics on " + listen + ": " + e.what());
  }
}

HttpEndpoint::~HttpEndpoint() = default;

int HttpEndpoint::port() const {
  return server_->port();
}

std::string HttpEndpoint::metrics_url() const {
  return server_->metrics_url();
}

}  // namespace hsm::agent
