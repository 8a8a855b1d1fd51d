// The read side of a connection, who holds it and how it changes hands.
//
// Invariant: at most one thread reads the socket at a time: the holder of the read side,
// recorded in reader_ under mutex_ (kThread: the connection's reader thread; kCaller: the
// synchronous caller leader_ in await(); kNobody: no one). Only the holder calls recv(), uses
// frames_, dispatches answers and calls end(); it lets go only through pass_read_side_locked(),
// which chooses the next holder so that **whenever a pending call's answer can only come
// through this socket, someone holds the read side or is about to take it**:
//   - a call sent with ReadBy::kAnyone (asynchronous calls, retries from the timer thread)
//     gives the read side to the reader thread when nobody holds it; the reader thread reads
//     while any such call is pending (PendingCalls::without_own_reader()); then it hands the
//     read side to a waiting caller, or keeps it "idle" (thread_idle_: waiting in poll() for
//     data, not in recv()), so that a stream of asynchronous calls costs no hand-overs;
//   - a call sent with ReadBy::kSender is read by its own caller in await(): it takes the read
//     side when nobody holds it or the reader thread is idle (that is the fast path: no other
//     thread is woken before its answer; an idle reader thread is told to let go), or follows
//     (sleeps on its CompletionFlag) while another thread reads; a holder that lets go hands
//     the read side to the oldest follower whose call is still pending here (a nudge), else to
//     the reader thread if it is needed, else to nobody (any caller still on its way to
//     await() takes it then);
//   - once the peer hangs up or the connection is broken, the read side goes to the reader
//     thread (it reads up to the end of the stream, then fails what is left), and once it has
//     ended, nobody reads and the reader thread returns. A call whose request is still being
//     written when the connection ends is failed by its writer instead, who alone knows whether
//     any byte of it left (none: it goes out again on a fresh connection, not counted as a
//     retry).
// A caller holds the read side only while its own call is pending here and its deadline has
// not passed. The reader thread, while it does not hold it, sleeps in poll() on the socket for
// a hang-up only (data arriving does not wake it) and on an eventfd for a hand-over, so a
// closed socket is noticed promptly even while nobody reads. Whoever holds the read side
// dispatches every complete answer it has received before it lets go; an idle reader thread
// touches the socket again only after checking, under mutex_, that it still holds it.
#include "connection.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <limits>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "call_runner.hpp"

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
  return Error(std::string(kConnectionFailed), "connection to " + path + " " + what);
}

int poll_timeout_ms(Clock::time_point deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<std::chrono::milliseconds::rep>(left, 0, 60'000));
}

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
    return Error(std::string(kProtocolError),
                 std::string("the agent sent bytes that break the protocol: ") + error.what());
  } catch (const Error& error) {
    return error;
  } catch (const std::exception& error) {
    return Error(std::string(kProtocolError), error.what());
  } catch (...) {
    return Error(std::string(kProtocolError), "unknown failure while reading the answers");
  }
}

timespec to_timespec(Clock::duration duration) {
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(duration);
  return timespec{
      static_cast<std::time_t>(seconds.count()),
      static_cast<long>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(duration - seconds).count())};
}

UniqueFd make_wake_fd(const std::string& path) {
  UniqueFd fd{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  if (!fd.valid()) {
    throw connection_error(path, "cannot be read: eventfd: " + describe_errno(errno));
  }
  return fd;
}

}  // namespace

Connection::Connection(UniqueFd fd, const ConnectionSettings& settings, CallRunner& runner)
    : fd_(std::move(fd)),
      wake_fd_(make_wake_fd(settings.socket_path)),
      settings_(settings),
      runner_(runner),
      frames_(settings.response_limits, kReadChunkBytes) {}

std::variant<Connection::Sent, Failure> Connection::send(const std::shared_ptr<Call>& call,
                                                         ReadBy read_by) {
  std::uint32_t msgid = 0;
  bool wake_reader = false;
  {
    std::lock_guard lock(mutex_);
    // Checked under the same lock end() takes to drain the calls, so a call is either drained
    // by the thread reading or refused here, never lost in between.
    if (!usable()) {
      return Failure{connection_error(settings_.socket_path, "is closed"), Delivery::kNotSent};
    }
    msgid = pending_.add(call, read_by == ReadBy::kSender);
    if (read_by == ReadBy::kAnyone && reader_ == ReadSide::kNobody) {
      reader_ = ReadSide::kThread;
      wake_reader = true;
    }
  }
  if (wake_reader) {
    wake_reader_thread();
  }
  auto withdraw = [&](Failure failure) -> std::variant<Sent, Failure> {
    // When the entry is already gone the thread reading drained it and reports the call.
    if (!forget(msgid, call.get())) {
      return Sent{msgid};
    }
    return failure;
  };

  const auto deadline = call->deadline();
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) {
    return withdraw(
        {Error(std::string(kTimeout), "the deadline passed before the request was sent"),
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
        {Error(std::string(kInvalidParams), "the request has " + std::to_string(encoded.size()) +
                                                " bytes, more than the agent accepts (" +
                                                std::to_string(settings_.max_request_bytes) + ")"),
         Delivery::kNotSent});
  }

  call->set_in_flight({weak_from_this(), msgid});
  // A timeout that struck before set_in_flight() could not withdraw the entry; do it here.
  if (call->finished()) {
    forget(msgid, call.get());
    return Sent{msgid};
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
  if (failure) {
    return std::move(*failure);
  }
  return Sent{msgid};  // on its way, or already answered, timed out or failed by others
}

Connection::WriteResult Connection::write_all(const char* data, std::size_t size,
                                              Clock::time_point deadline) {
  std::unique_lock lock(write_mutex_, std::defer_lock);
  if (!lock.try_lock_until(deadline)) {
    return {WriteStatus::kNothingWritten,
            Error(std::string(kTimeout), "the deadline passed while waiting to send"), false};
  }
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
        return fail(
            Error(std::string(kTimeout), "the deadline passed while the agent was not reading"),
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

void Connection::mark_broken() noexcept {
  broken_.store(true, std::memory_order_release);
  // Wakes whoever reads out of recv() or poll() (it then reads to the end and fails the pending
  // calls) and any writer waiting in poll(). The descriptor itself stays open until the last
  // owner lets go.
  ::shutdown(fd_.get(), SHUT_RDWR);
  wake_reader_thread();  // the shutdown wakes its poll() too; this does not depend on it
}

void Connection::close() noexcept {
  mark_broken();
}

void Connection::wake_reader_thread() noexcept {
  const std::uint64_t one = 1;
  // Cannot fail short of a counter at 2^64 - 1; a pending wake-up is as good as a new one.
  (void)::write(wake_fd_.get(), &one, sizeof one);
}

void Connection::drain_wake_fd() noexcept {
  std::uint64_t count = 0;
  (void)::read(wake_fd_.get(), &count, sizeof count);  // resets it; EAGAIN: already reset
}

void Connection::deliver(Handoff&& handoff) noexcept {
  if (handoff.nudge != nullptr) {
    handoff.nudge->nudge();
  }
  if (handoff.wake_reader_thread) {
    wake_reader_thread();
  }
}

Connection::Handoff Connection::pass_read_side_locked() {
  leader_ = nullptr;
  if (end_reason_) {
    reader_ = ReadSide::kNobody;
    return {nullptr, nullptr, true};  // the reader thread sees the end and returns
  }
  if (hangup_seen_ || !usable()) {
    reader_ = ReadSide::kThread;  // the end of the stream is near: read it, fail what is left
    return {nullptr, nullptr, true};
  }
  if (pending_.empty()) {
    reader_ = ReadSide::kNobody;
    return {};
  }
  if (auto handoff = offer_to_follower_locked()) {
    return std::move(*handoff);
  }
  if (pending_.without_own_reader() > 0) {
    reader_ = ReadSide::kThread;
    return {nullptr, nullptr, true};
  }
  // Only calls whose callers have not reached await() yet: the first of them takes it.
  reader_ = ReadSide::kNobody;
  return {};
}

std::optional<Connection::Handoff> Connection::offer_to_follower_locked() {
  for (auto it = followers_.begin(); it != followers_.end(); ++it) {
    const Waiter* follower = *it;
    if (!follower->done->is_set() && pending_.holds(follower->msgid, follower->call.get())) {
      followers_.erase(it);
      reader_ = ReadSide::kCaller;
      leader_ = follower;
      return Handoff{follower->call, follower->done, false};
    }
  }
  return std::nullopt;
}

Connection::Handoff Connection::leave_locked(const Waiter& me) {
  std::erase(followers_, &me);
  if (reader_ == ReadSide::kCaller && leader_ == &me) {
    return pass_read_side_locked();
  }
  return {};
}

bool Connection::await(const std::shared_ptr<Call>& call, CompletionFlag& done,
                       std::uint32_t msgid) {
  const Clock::time_point deadline = call->deadline();
  const Waiter me{call, &done, msgid};
  std::unique_lock lock(mutex_);
  for (;;) {
    if (done.is_set() || end_reason_ || !pending_.holds(msgid, call.get())) {
      // Completed, or its answer will not come through here (it was read and the call is being
      // retried elsewhere, or the connection ended and failed it): wait without reading.
      Handoff handoff = leave_locked(me);
      lock.unlock();
      deliver(std::move(handoff));
      return done.wait_until(deadline);
    }
    // Nobody reads, or the reader thread has nothing to read but waits for more: read.
    bool taken_from_thread = false;
    if (reader_ == ReadSide::kNobody || (reader_ == ReadSide::kThread && thread_idle_)) {
      taken_from_thread = reader_ == ReadSide::kThread;
      reader_ = ReadSide::kCaller;
      leader_ = &me;
    }
    if (reader_ == ReadSide::kCaller && leader_ == &me) {
      std::erase(followers_, &me);
      lock.unlock();
      if (taken_from_thread) {
        wake_reader_thread();  // it sees the read side gone and stops watching for data
      }
      const LeadEnd lead_end = lead(me, deadline);
      lock.lock();
      if (lead_end == LeadEnd::kDeadline) {
        Handoff handoff = leave_locked(me);
        lock.unlock();
        deliver(std::move(handoff));
        return done.is_set();
      }
      continue;  // answered, or the connection ended: the check above lets go
    }
    // Someone else reads: follow, until the answer is in or the read side is handed over.
    if (std::find(followers_.begin(), followers_.end(), &me) == followers_.end()) {
      followers_.push_back(&me);
    }
    lock.unlock();
    const CompletionFlag::Wake wake = done.wait_until_set_or_nudged(deadline);
    lock.lock();
    if (wake == CompletionFlag::Wake::kTimedOut) {
      Handoff handoff = leave_locked(me);
      lock.unlock();
      deliver(std::move(handoff));
      return done.is_set();
    }
  }
}

Connection::LeadEnd Connection::lead(const Waiter& me, Clock::time_point deadline) noexcept {
  std::optional<Error> reason;  // built only when the connection ends (not on every read)
  try {
    for (;;) {
      const auto left = deadline - Clock::now();
      if (left <= Clock::duration::zero()) {
        return LeadEnd::kDeadline;
      }
      // poll() bounds the wait by the deadline; recv() then takes what is there.
      pollfd descriptor{fd_.get(), POLLIN, 0};
      const timespec timeout = to_timespec(left);
      const int ready = ::ppoll(&descriptor, 1, &timeout, nullptr);
      if (ready == 0 || (ready < 0 && errno == EINTR)) {
        continue;
      }
      if (ready < 0) {
        reason = connection_error(settings_.socket_path, "failed: poll: " + describe_errno(errno));
        break;
      }
      const auto chunk = read_chunk(MSG_DONTWAIT, reason);
      if (chunk == ChunkRead::kNothing) {
        continue;
      }
      if (chunk == ChunkRead::kEnd) {
        break;
      }
      // Every complete answer is dispatched, not only up to our own: nobody may be reading
      // after we let go.
      bool answered = false;
      while (auto message = frames_.next()) {
        answered = dispatch(message->get(), ReportingThread::kCaller) == me.call.get() || answered;
      }
      if (answered) {
        return LeadEnd::kAnswered;
      }
    }
  } catch (...) {
    reason = read_failure();
  }
  end(std::move(reason), ReportingThread::kCaller);
  return LeadEnd::kEnded;
}

void Connection::read_loop() noexcept {
  while (wait_for_read_side()) {
    if (!read_for_others()) {
      return;
    }
  }
}

bool Connection::wait_for_read_side() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    if (end_reason_) {
      return false;
    }
    if (reader_ == ReadSide::kThread) {
      return true;
    }
    if (reader_ == ReadSide::kNobody && (hangup_seen_ || !usable())) {
      reader_ = ReadSide::kThread;  // read up to the end of the stream and fail what is left
      return true;
    }
    // A hang-up seen once stays (poll() would report it at once again): from then on only a
    // hand-over wakes us.
    const bool watch_socket = !hangup_seen_;
    lock.unlock();
    std::array<pollfd, 2> descriptors{
        {{watch_socket ? fd_.get() : -1, POLLRDHUP, 0}, {wake_fd_.get(), POLLIN, 0}}};
    const int ready = ::poll(descriptors.data(), descriptors.size(), -1);
    const int poll_error = ready < 0 ? errno : 0;
    if (ready > 0 && (descriptors[1].revents & POLLIN) != 0) {
      drain_wake_fd();
    }
    lock.lock();
    if ((ready > 0 && (descriptors[0].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) ||
        (ready < 0 && poll_error != EINTR)) {
      // (poll() itself failing cannot be waited out: read instead, as soon as we may.)
      hangup_seen_ = true;
    }
  }
}

bool Connection::read_for_others() noexcept {
  std::optional<Error> reason;  // built only when the connection ends (not on every read)
  try {
    for (;;) {
      int recv_flags = 0;  // blocks in recv() while answers only we will read are pending
      {
        std::unique_lock lock(mutex_);
        if (usable() && !hangup_seen_ && pending_.without_own_reader() == 0) {
          // Nothing is left that only we would read. A waiting caller reads for itself from
          // now on; with none waiting, keep the read side (the next asynchronous call then
          // needs no wake-up) but wait where a caller can take it from us: in poll().
          if (auto handoff = offer_to_follower_locked()) {
            lock.unlock();
            deliver(std::move(*handoff));
            return true;
          }
          thread_idle_ = true;
          lock.unlock();
          std::array<pollfd, 2> descriptors{{{fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}}};
          const int ready = ::poll(descriptors.data(), descriptors.size(), -1);
          const int poll_error = ready < 0 ? errno : 0;
          if (ready > 0 && (descriptors[1].revents & POLLIN) != 0) {
            drain_wake_fd();
          }
          lock.lock();
          thread_idle_ = false;
          if (reader_ != ReadSide::kThread) {
            return true;  // a caller took the read side
          }
          if (ready < 0 && poll_error != EINTR) {
            recv_flags = 0;  // poll() itself fails: wait in recv() instead
          } else if (ready <= 0 || descriptors[0].revents == 0) {
            continue;  // woken for something else: look again
          } else {
            recv_flags = MSG_DONTWAIT;  // a caller may have read what poll() saw meanwhile
          }
        }
      }
      const auto chunk = read_chunk(recv_flags, reason);
      if (chunk == ChunkRead::kNothing) {
        continue;
      }
      if (chunk == ChunkRead::kEnd) {
        break;
      }
      while (auto message = frames_.next()) {
        dispatch(message->get(), ReportingThread::kClient);
      }
    }
  } catch (...) {
    reason = read_failure();
  }
  end(std::move(reason), ReportingThread::kClient);
  return false;
}

Connection::ChunkRead Connection::read_chunk(int recv_flags, std::optional<Error>& reason) {
  std::span<char> space = frames_.prepare(kReadChunkBytes);
  if (space.empty()) {
    throw protocol::FrameError(protocol::FrameErrorReason::kTooLarge,
                               "an answer exceeds the client's max_response_bytes");
  }
  const ssize_t n = ::recv(fd_.get(), space.data(), space.size(), recv_flags);
  if (n < 0) {
    const int error = errno;
    if (error == EINTR || error == EAGAIN || error == EWOULDBLOCK) {
      return ChunkRead::kNothing;
    }
    reason = connection_error(settings_.socket_path, "failed: " + describe_errno(error));
    return ChunkRead::kEnd;
  }
  if (n == 0) {
    if (!usable()) {
      reason = connection_error(settings_.socket_path, "was closed");
    }
    return ChunkRead::kEnd;
  }
  frames_.commit(static_cast<std::size_t>(n));
  return ChunkRead::kBytes;
}

void Connection::end(std::optional<Error> reason, ReportingThread thread) noexcept {
  // Built here, not by the readers up front: most connections never end while in use.
  Error why = reason ? std::move(*reason)
                     : connection_error(settings_.socket_path, "was closed by the agent");
  std::vector<std::shared_ptr<Call>> orphans;
  {
    std::lock_guard lock(mutex_);
    broken_.store(true, std::memory_order_release);
    end_reason_ = why;
    // A call whose request is still being written is failed by its writer (send()).
    orphans = pending_.take_all_written();
  }
  ::shutdown(fd_.get(), SHUT_RDWR);  // writers blocked in poll() see the end too
  for (auto& call : orphans) {
    runner_.on_failure(call, {why, Delivery::kMaybeSent}, thread);
  }
}

const Call* Connection::dispatch(const msgpack::object& message, ReportingThread thread) {
  const auto msgid = protocol::response_msgid(message);
  if (!msgid) {
    // The stream is framed correctly but the peer is not speaking the protocol: nothing it
    // says can be matched to a call any more.
    throw Error(std::string(kProtocolError), "the agent sent a message that is not a response");
  }
  std::shared_ptr<Call> call;
  {
    std::lock_guard lock(mutex_);
    call = pending_.take(*msgid);
  }
  if (!call || call->finished()) {
    return nullptr;  // its call timed out: the late answer is dropped
  }

  Answer answer = [&]() -> Answer {
    try {
      return to_answer(protocol::decode_response(message, call->method()));
    } catch (const std::exception& error) {
      // Only this answer is bad; the framing is intact, so the connection stays up.
      return Error(std::string(kProtocolError),
                   "malformed answer to " + std::string(protocol::to_string(call->method())) +
                       ": " + error.what());
    }
  }();
  runner_.on_answer(call, std::move(answer), thread);
  return call.get();
}

}  // namespace hsm::client
