// How answers come back: whoever holds the read turn (the reader thread, or a synchronous caller
// reading for its own answer; connection.hpp) reads the socket, decodes every complete answer in
// what it got and hands each to its call; answers to calls no longer pending are dropped. When
// the stream ends (the agent closed it, close() shut it down, or it broke the protocol) the
// reader fails every call still pending. A call whose request is still being written at that
// moment is failed by its writer instead, who alone knows whether any byte of it left (none: it
// goes out again on a fresh connection, not counted as a retry).
#include "connection.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "poll_then_block.hpp"

namespace hsm::client {
namespace {

// Bytes asked of each recv(): large enough to take many pipelined answers in one system call.
constexpr std::size_t kReadChunkBytes = std::size_t{64} * 1024;
// A thread's encode buffer is kept between calls (no allocation per request) unless a large
// request made it grow beyond this.
constexpr std::size_t kKeptEncodeBufferBytes = std::size_t{64} * 1024;

/// strerror() is not thread-safe; the error_code message is.
std::string describe_errno(int error) {
  return std::error_code(error, std::generic_category()).message();
}

Error connection_error(const std::string& path, const std::string& what) {
  return Error(Errc::kConnectionFailed, "connection to " + path + " " + what);
}

// A caller reading for its answer looks up from poll() at least this often, to notice that its
// call completed elsewhere (cancelled through its stop_token; its deadline is the poll's end).
constexpr auto kCallerWaitSlice = std::chrono::milliseconds(10);

Answer to_answer(protocol::Response&& response) {
  if (auto* error = std::get_if<protocol::Error>(&response.body)) {
    return Error(std::string(protocol::to_string(error->code)), error->message,
                 std::move(error->ckr));
  }
  return std::get<protocol::Result>(std::move(response.body));
}

/// Called inside a catch block: the error that ends the connection when reading threw.
Error read_failure() noexcept {
  try {
    throw;
  } catch (const protocol::FrameError& error) {
    return Error(Errc::kProtocolError,
                 std::string("the agent sent bytes that break the protocol: ") + error.what());
  } catch (const Error& error) {
    return error;
  } catch (const std::exception& error) {
    return Error(Errc::kProtocolError, error.what());
  } catch (...) {
    return Error(Errc::kProtocolError, "unknown failure while reading the answers");
  }
}

/// Waits for `mutex` until `deadline`. On the system clock: libstdc++ waits for a steady_clock
/// deadline with pthread_mutex_clocklock, which ThreadSanitizer does not intercept (the tsan
/// preset must stay usable), and for a system_clock one with pthread_mutex_timedlock, which it
/// does. Slices of at most 10 ms keep a step of the wall clock from stretching the wait.
bool lock_until(std::timed_mutex& mutex, Clock::time_point deadline) {
  for (;;) {
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) {
      return mutex.try_lock();
    }
    const auto slice = std::min<Clock::duration>(left, std::chrono::milliseconds(10));
    if (mutex.try_lock_until(std::chrono::system_clock::now() + slice)) {
      return true;
    }
  }
}

}  // namespace

Connection::Connection(UniqueFd fd, const ConnectionSettings& settings,
                       const AttemptEnded& attempt_ended)
    : fd_(std::move(fd)),
      settings_(settings),
      attempt_ended_(attempt_ended),
      frames_(settings.response_limits, kReadChunkBytes) {}

std::optional<Failure> Connection::send(const std::shared_ptr<Call>& call, bool caller_reads) {
  std::uint32_t msgid = 0;
  {
    std::lock_guard lock(mutex_);
    // Checked under the same lock end() takes to drain the calls, so a call is either drained
    // by the reader or refused here, never lost in between.
    if (!usable()) {
      return Failure{connection_error(settings_.socket_path, "is closed"), Delivery::kNotSent};
    }
    msgid = pending_.add(call);
  }
  if (!caller_reads) {
    reader_wanted_.notify_one();  // a sleeping reader thread has an answer to wait for
  }
  auto withdraw = [&](Failure failure) -> std::optional<Failure> {
    // When the entry is already gone the reader drained it and reports the call.
    if (!forget(msgid, call.get())) {
      return std::nullopt;
    }
    return failure;
  };

  const auto deadline = call->deadline();
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) {
    return withdraw({Error(Errc::kTimeout, "the deadline passed before the request was sent"),
                     Delivery::kNotSent});
  }
  protocol::Request& request = call->request();
  request.msgid = msgid;
  request.timeout_ms = static_cast<std::uint32_t>(
      std::min<std::chrono::milliseconds::rep>(left, std::numeric_limits<std::uint32_t>::max()));

  thread_local msgpack::sbuffer encoded;
  // The buffer is reused by this thread's next request; one that a large request made big is
  // dropped then rather than kept for good.
  if (encoded.size() > kKeptEncodeBufferBytes) {
    encoded = msgpack::sbuffer{};
  } else {
    encoded.clear();
  }
  protocol::encode_request(request, encoded);
  if (encoded.size() > settings_.max_request_bytes) {
    return withdraw(
        {Error(Errc::kInvalidParams, "the request has " + std::to_string(encoded.size()) +
                                         " bytes, more than the agent accepts (" +
                                         std::to_string(settings_.max_request_bytes) + ")"),
         Delivery::kNotSent});
  }

  call->set_in_flight({weak_from_this(), msgid});
  // A timeout that struck before set_in_flight() could not withdraw the entry; do it here.
  if (call->finished()) {
    forget(msgid, call.get());
    return std::nullopt;
  }

  WriteResult written = write_all(encoded.data(), encoded.size(), deadline);
  // While its request was being written the call was ours alone to fail: a connection that
  // ended meanwhile left it here (end() cannot know whether any byte of it left; we do).
  std::optional<Failure> failure;
  {
    std::lock_guard lock(mutex_);
    const bool still_pending = pending_.written(msgid, call.get());
    if (still_pending && (written.status != WriteStatus::kDone || end_reason_)) {
      pending_.remove(msgid, call.get());
      if (written.status != WriteStatus::kDone) {
        failure = Failure{std::move(*written.error), written.status == WriteStatus::kNothingWritten
                                                         ? Delivery::kNotSent
                                                         : Delivery::kMaybeSent};
      } else {
        failure = Failure{*end_reason_, Delivery::kMaybeSent};
      }
    }
  }
  if (written.breaks_connection) {
    mark_broken();
  }
  return failure;  // none: on its way, or already answered, timed out or failed by others
}

Connection::WriteResult Connection::write_all(const char* data, std::size_t size,
                                              Clock::time_point deadline) {
  if (!lock_until(write_mutex_, deadline)) {
    return {WriteStatus::kNothingWritten,
            Error(Errc::kTimeout, "the deadline passed while waiting to send"), false};
  }
  const std::lock_guard lock(write_mutex_, std::adopt_lock);
  // Checked under the lock: a writer that cut its request in the middle marks the connection
  // unusable before it lets go, so nothing is ever appended to half a message.
  if (!usable()) {
    return {WriteStatus::kNothingWritten, connection_error(settings_.socket_path, "is closed"),
            false};
  }
  std::size_t written = 0;
  auto fail = [&](Error error, bool breaks_connection) -> WriteResult {
    if (breaks_connection) {
      broken_.store(true, std::memory_order_release);
    }
    return {written == 0 ? WriteStatus::kNothingWritten : WriteStatus::kPartlyWritten,
            std::move(error), breaks_connection};
  };
  while (written < size) {
    // MSG_NOSIGNAL: a vanished agent is an EPIPE here, never a SIGPIPE for the application.
    // MSG_DONTWAIT: a full socket buffer is waited out in poll(), bounded by the deadline.
    const ssize_t n =
        ::send(fd_.get(), data + written, size - written, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      written += static_cast<std::size_t>(n);
      continue;
    }
    const int error = errno;
    if (n < 0 && error == EINTR) {
      continue;
    }
    if (n < 0 && (error == EAGAIN || error == EWOULDBLOCK)) {
      const int timeout_ms = poll_timeout_ms(deadline);
      if (timeout_ms == 0) {
        // A request cut in the middle would corrupt the stream for every call after it.
        return fail(Error(Errc::kTimeout, "the deadline passed while the agent was not reading"),
                    written > 0);
      }
      pollfd descriptor{fd_.get(), POLLOUT, 0};
      (void)::poll(&descriptor, 1, timeout_ms);  // EINTR, errors: the next send() tells
      continue;
    }
    return fail(connection_error(settings_.socket_path, "failed: " + describe_errno(error)), true);
  }
  return {WriteStatus::kDone, std::nullopt, false};
}

bool Connection::forget(std::uint32_t msgid, const Call* call) {
  std::lock_guard lock(mutex_);
  return pending_.remove(msgid, call);
}

std::size_t Connection::pending_calls() {
  std::lock_guard lock(mutex_);
  return pending_.size();
}

void Connection::mark_broken() noexcept {
  {
    // Under the lock the reader thread checks must_read_locked() with, so it cannot miss it.
    std::lock_guard lock(mutex_);
    broken_.store(true, std::memory_order_release);
  }
  // Wakes whoever reads out of recv() or poll() (the reader then fails the pending calls) and
  // any writer waiting in poll(), and a sleeping reader thread. The descriptor itself stays open
  // until the last owner lets go.
  ::shutdown(fd_.get(), SHUT_RDWR);
  reader_wanted_.notify_all();
}

void Connection::close() noexcept {
  mark_broken();
}

void Connection::read_loop() noexcept {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      if (reader_ == Reader::kReaderThread && !must_read_locked()) {
        reader_ = Reader::kNobody;  // nothing awaited: a synchronous caller may read for itself
      }
      reader_wanted_.wait(lock, [&] { return reader_ != Reader::kCaller && must_read_locked(); });
      reader_ = Reader::kReaderThread;
    }
    if (!read_some(attempt_ended_, std::chrono::nanoseconds::zero(), Clock::time_point::max())) {
      return;
    }
  }
}

bool Connection::read_until_answered(const Call& call, std::uint32_t msgid,
                                     std::chrono::nanoseconds spin, const AttemptEnded& deliver) {
  {
    std::lock_guard lock(mutex_);
    if (reader_ != Reader::kNobody) {
      return false;
    }
    reader_ = Reader::kCaller;
  }
  const auto spin_end = Clock::now() + spin;
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (!pending_.holds(msgid, &call) || !usable()) {
        break;  // answered, withdrawn or failed; or the connection is ending (the thread reads on)
      }
    }
    const auto now = Clock::now();
    if (call.finished() || now >= call.deadline()) {
      break;  // completed elsewhere, or its timer is about to fail it
    }
    const auto spin_left =
        std::max(std::chrono::nanoseconds::zero(), std::chrono::nanoseconds(spin_end - now));
    if (!read_some(deliver, spin_left, std::min(call.deadline(), now + kCallerWaitSlice))) {
      break;
    }
  }
  hand_back_read_turn();
  return true;
}

void Connection::hand_back_read_turn() noexcept {
  bool wake = false;
  {
    std::lock_guard lock(mutex_);
    reader_ = Reader::kNobody;
    wake = must_read_locked();
  }
  if (wake) {
    reader_wanted_.notify_one();  // answers of other calls are still awaited
  }
}

bool Connection::read_some(const AttemptEnded& deliver, std::chrono::nanoseconds spin,
                           Clock::time_point until) {
  std::optional<Error> reason;  // built only when the connection ends (not on every read)
  try {
    std::span<char> space = frames_.prepare(kReadChunkBytes);
    if (space.empty()) {
      throw protocol::FrameError(protocol::FrameErrorReason::kTooLarge,
                                 "an answer exceeds the client's max_response_bytes");
    }
    const Received got = receive(fd_.get(), space, spin, until);
    switch (got.kind) {
      case Received::Kind::kNothing:
        return true;
      case Received::Kind::kFailed:
        reason = connection_error(settings_.socket_path, "failed: " + describe_errno(got.error));
        break;
      case Received::Kind::kEnd:
        if (!usable()) {
          reason = connection_error(settings_.socket_path, "was closed");
        }
        break;
      case Received::Kind::kData:
        frames_.commit(got.size);
        while (auto message = frames_.next()) {
          dispatch(message->get(), deliver);
        }
        return true;
    }
  } catch (...) {
    reason = read_failure();
  }
  end(std::move(reason), deliver);
  return false;
}

void Connection::end(std::optional<Error> reason, const AttemptEnded& deliver) noexcept {
  // Built here, not by the reader up front: most connections never end while in use.
  Error why = reason ? std::move(*reason)
                     : connection_error(settings_.socket_path, "was closed by the agent");
  std::vector<std::shared_ptr<Call>> orphans;
  {
    std::lock_guard lock(mutex_);
    broken_.store(true, std::memory_order_release);
    if (end_reason_) {
      why = *end_reason_;  // a caller saw the end first; the reader thread only confirms it
    } else {
      end_reason_ = why;
    }
    // A call whose request is still being written is failed by its writer (send()).
    orphans = pending_.take_all_written();
  }
  ::shutdown(fd_.get(), SHUT_RDWR);  // writers blocked in poll() see the end too
  reader_wanted_.notify_all();       // a sleeping reader thread reads the stream's end and returns
  for (auto& call : orphans) {
    deliver(call, Answer(why));
  }
}

void Connection::dispatch(const msgpack::object& message, const AttemptEnded& deliver) {
  const auto msgid = protocol::response_msgid(message);
  if (!msgid) {
    // The stream is framed correctly but the peer is not speaking the protocol: nothing it
    // says can be matched to a call any more.
    throw Error(Errc::kProtocolError, "the agent sent a message that is not a response");
  }
  std::shared_ptr<Call> call;
  {
    std::lock_guard lock(mutex_);
    call = pending_.take(*msgid);
  }
  if (!call || call->finished()) {
    return;  // its call timed out or was cancelled: the late answer is dropped
  }

  Answer answer = [&]() -> Answer {
    try {
      return to_answer(protocol::decode_response(message, call->method()));
    } catch (const std::exception& error) {
      // Only this answer is bad; the framing is intact, so the connection stays up.
      return Error(Errc::kProtocolError, "malformed answer to " +
                                             std::string(protocol::to_string(call->method())) +
                                             ": " + error.what());
    }
  }();
  deliver(call, std::move(answer));
}

}  // namespace hsm::client
