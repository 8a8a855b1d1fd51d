#include "server/connection_output.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <memory>

namespace hsm::agent {
namespace {

// One uv_write in progress: owns its bytes until the write callback.
struct WriteRequest {
  uv_write_t req{};
  std::string data;
};

// An emptied queue keeps up to this much capacity for the next answers; more goes back.
constexpr std::size_t kKeptQueueCapacity = 64 * 1024;

}  // namespace

void ConnectionOutput::attach(int fd) {
  std::lock_guard lock(mutex_);
  fd_ = fd;
}

void ConnectionOutput::charge_to(std::shared_ptr<MemoryBudget::Meter> meter) {
  std::lock_guard lock(mutex_);
  charge_ = MemoryBudget::Charge(std::move(meter), buffered_locked());
}

void ConnectionOutput::note_buffered_locked() noexcept {
  if (queued_.empty() && queued_.capacity() > kKeptQueueCapacity) std::string().swap(queued_);
  charge_.resize(buffered_locked());
}

bool ConnectionOutput::queue(std::string_view bytes) {
  std::lock_guard lock(mutex_);
  if (buffered_locked() + bytes.size() > max_buffered_bytes_) return false;
  queued_.append(bytes);
  note_buffered_locked();
  return true;
}

ConnectionOutput::FlushResult ConnectionOutput::flush(uv_stream_t* stream, void* write_data,
                                                      uv_write_cb on_write) {
  // Held across the writes: a worker must not write between our bytes.
  std::lock_guard lock(mutex_);
  if (write_in_progress_) return FlushResult::kWriting;
  if (queued_.empty()) return FlushResult::kDone;
  if (fd_ < 0) return FlushResult::kFailed;
  uv_buf_t buf = uv_buf_init(queued_.data(), static_cast<unsigned>(queued_.size()));
  const int written = uv_try_write(stream, &buf, 1);
  std::size_t done = 0;
  if (written > 0) {
    done = static_cast<std::size_t>(written);
  } else if (written != UV_EAGAIN && written != UV_ENOSYS) {
    return FlushResult::kFailed;
  }
  if (done == queued_.size()) {
    queued_.clear();
    note_buffered_locked();
    return FlushResult::kDone;
  }
  auto request = std::make_unique<WriteRequest>();
  request->data.assign(queued_, done);
  queued_.clear();
  request->req.data = write_data;
  uv_buf_t rest = uv_buf_init(request->data.data(), static_cast<unsigned>(request->data.size()));
  if (uv_write(&request->req, stream, &rest, 1, on_write) != 0) {
    note_buffered_locked();
    return FlushResult::kFailed;
  }
  writing_bytes_ = request->data.size();
  write_in_progress_ = true;
  note_buffered_locked();
  request.release();  // owned by libuv until finish_write()
  return FlushResult::kWriting;
}

bool ConnectionOutput::finish_write(uv_write_t* request) {
  std::unique_ptr<WriteRequest> owned(reinterpret_cast<WriteRequest*>(request));
  std::lock_guard lock(mutex_);
  write_in_progress_ = false;
  writing_bytes_ = 0;
  note_buffered_locked();
  return !queued_.empty();
}

bool ConnectionOutput::idle() const {
  std::lock_guard lock(mutex_);
  return queued_.empty() && !write_in_progress_;
}

void ConnectionOutput::close() {
  std::lock_guard lock(mutex_);
  fd_ = -1;
  queued_.clear();
  queued_.shrink_to_fit();
  note_buffered_locked();
}

bool ConnectionOutput::begin_request(std::size_t max_in_flight) {
  std::lock_guard lock(mutex_);
  ++in_flight_;
  max_in_flight_ = max_in_flight;
  if (in_flight_ >= max_in_flight) paused_at_limit_ = true;
  return paused_at_limit_;
}

bool ConnectionOutput::end_request_on_loop() {
  std::lock_guard lock(mutex_);
  if (in_flight_ > 0) --in_flight_;
  if (paused_at_limit_ && in_flight_ < max_in_flight_) {
    paused_at_limit_ = false;
    return true;
  }
  return false;
}

std::size_t ConnectionOutput::in_flight() const {
  std::lock_guard lock(mutex_);
  return in_flight_;
}

ConnectionOutput::AfterAnswer ConnectionOutput::answer_from_worker(std::string_view bytes) {
  AfterAnswer after;
  std::lock_guard lock(mutex_);
  if (in_flight_ > 0) --in_flight_;
  if (paused_at_limit_ && in_flight_ < max_in_flight_) {
    paused_at_limit_ = false;
    after.resume = true;
  }
  if (fd_ < 0) return after;  // closed: the answer has nowhere to go
  std::size_t done = 0;
  if (queued_.empty() && !write_in_progress_) {
    // Nothing ahead of this answer: write it now. MSG_NOSIGNAL: a client that left is an error
    // here, not a SIGPIPE.
    while (done < bytes.size()) {
      const ssize_t sent =
          ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (sent > 0) {
        done += static_cast<std::size_t>(sent);
      } else if (sent < 0 && errno == EINTR) {
        continue;
      } else if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        break;  // the socket buffer is full: the rest waits for the loop
      } else {
        after.failed = true;
        return after;
      }
    }
    if (done == bytes.size()) return after;
    after.flush = true;  // nothing is writing what is left; the loop must
  }
  const auto rest = bytes.substr(done);
  if (buffered_locked() + rest.size() > max_buffered_bytes_) {
    after.slow_reader = true;
    return after;
  }
  queued_.append(rest);
  note_buffered_locked();
  return after;
}

}  // namespace hsm::agent
