#include "server/connection.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

namespace hsm::agent {
namespace {

// Bytes offered to each read. Small on purpose: 1,000 idle connections must stay cheap, and a
// request is typically ~100 bytes; a large message is assembled over several reads.
constexpr std::size_t kReadChunkBytes = 8 * 1024;

// An emptied answer queue keeps up to this much capacity for the next answers; more goes back
// (one slow reader's 4 MiB is not kept for ever).
constexpr std::size_t kKeptQueueCapacity = 64 * 1024;

// One uv_write in progress: owns its bytes until the write callback.
struct WriteRequest {
  uv_write_t req{};
  std::string data;
};

uv::Handle<uv_pipe_t> open_pipe(uv_loop_t* loop, int fd) {
  uv::Handle<uv_pipe_t> pipe;
  try {
    pipe = uv::Handle<uv_pipe_t>(loop, uv::init_pipe, "uv_pipe_init");
  } catch (...) {
    ::close(fd);
    throw;
  }
  const int rc = uv_pipe_open(pipe.get(), fd);
  if (rc < 0) {
    ::close(fd);  // the pipe does not own it yet
    throw uv::Error("uv_pipe_open", rc);
  }
  return pipe;
}

}  // namespace

Connection::Connection(uv_loop_t* loop, int fd, std::uint64_t id, Caller caller,
                       ConnectionEvents& events, const ConnectionLimits& limits)
    : pipe_(open_pipe(loop, fd)),
      id_(id),
      caller_(caller),
      events_(events),
      limits_(limits),
      reader_(limits.frame, 1024),
      last_activity_(std::chrono::steady_clock::now()) {
  pipe_->data = this;
}

void Connection::charge_to(MemoryBudget& budget, std::shared_ptr<MemoryBudget::Meter> meter) {
  budget_ = &budget;
  meter_ = std::move(meter);
  read_charge_ = MemoryBudget::Charge(meter_, reader_.buffered_bytes());
  output_charge_ = MemoryBudget::Charge(meter_, queued_.size() + writing_bytes_);
}

void Connection::start() {
  started_ = true;
  update_reading();
}

void Connection::update_reading() {
  if (closing_ || !started_) return;
  const bool wanted = wants_to_read();
  if (wanted == reading_) return;
  if (wanted) {
    if (uv_read_start(pipe_.stream(), on_alloc, on_read) != 0) {
      close();
      return;
    }
  } else {
    uv_read_stop(pipe_.stream());
  }
  reading_ = wanted;
}

void Connection::read_again() {
  if (!waiting_for_memory_) return;
  waiting_for_memory_ = false;
  update_reading();
}

bool Connection::peer_hung_up() const {
  uv_os_fd_t fd = -1;
  if (closing_ || uv_fileno(pipe_.base(), &fd) != 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

void Connection::note_buffered() {
  read_charge_.resize(reader_.buffered_bytes());
  if (reader_.buffered_bytes() == 0) {
    incomplete_since_.reset();
  } else if (!incomplete_since_) {
    incomplete_since_ = std::chrono::steady_clock::now();
  }
}

void Connection::note_queued() {
  if (queued_.empty() && queued_.capacity() > kKeptQueueCapacity) std::string().swap(queued_);
  output_charge_.resize(queued_.size() + writing_bytes_);
}

void Connection::begin_request() {
  ++in_flight_;
  if (in_flight_ >= limits_.max_in_flight && !paused_at_limit_) {
    paused_at_limit_ = true;  // backpressure: read no more until answers drain
    update_reading();
  }
}

void Connection::end_request() {
  if (in_flight_ > 0) --in_flight_;
  if (paused_at_limit_ && in_flight_ < limits_.max_in_flight) {
    paused_at_limit_ = false;
    // The time paused was the agent's doing: an incomplete message's read timeout starts again.
    if (incomplete_since_) incomplete_since_ = std::chrono::steady_clock::now();
    deliver_messages();  // may pause again
    update_reading();
  }
}

void Connection::stop_reading() {
  stopped_ = true;
  update_reading();
}

void Connection::on_alloc(uv_handle_t* handle, std::size_t, uv_buf_t* buf) {
  auto* self = static_cast<Connection*>(handle->data);
  std::size_t room =
      self->budget_ ? self->budget_->read_room(*self->meter_, kReadChunkBytes) : kReadChunkBytes;
  if (self->input_limit_ != 0) {
    // One byte past the limit is room enough to see that the client sent more than allowed.
    room = std::min(room, self->input_limit_ + 1 - std::min(self->input_read_, self->input_limit_));
  }
  if (room == 0) {
    self->waiting_for_memory_ = true;
    *buf = uv_buf_init(nullptr, 0);  // libuv reports UV_ENOBUFS to on_read
    return;
  }
  try {
    const auto span = self->reader_.prepare(room);
    // The reader may offer more than asked for (its buffer's capacity): read no more than room.
    *buf = uv_buf_init(span.data(), static_cast<unsigned>(std::min(span.size(), room)));
  } catch (const std::exception&) {
    *buf = uv_buf_init(nullptr, 0);  // libuv reports UV_ENOBUFS to on_read
  }
}

void Connection::on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
  auto* self = static_cast<Connection*>(stream->data);
  if (nread == UV_ENOBUFS && self->waiting_for_memory_) {
    // No room in the memory budget: stop reading (libuv would ask again at once) until bytes
    // are released. The client's bytes wait in the kernel.
    self->update_reading();
    self->events_.on_waiting_for_memory(*self);
    return;
  }
  if (nread < 0) {
    self->close();  // EOF or error: the client is gone
    return;
  }
  if (nread == 0) return;
  self->input_read_ += static_cast<std::size_t>(nread);
  if (self->input_limit_ != 0 && self->input_read_ > self->input_limit_) {
    self->close();  // more than it may send
    return;
  }
  try {
    self->reader_.commit(static_cast<std::size_t>(nread));
  } catch (const protocol::FrameError& error) {
    self->events_.on_frame_error(*self, error);
    self->close();
    return;
  }
  self->note_buffered();
  self->deliver_messages();
}

void Connection::deliver_messages() {
  // An answer given while a message is delivered (a refusal, capabilities) may end the pause at
  // the in-flight limit and ask to deliver again: the loop below goes on instead, so the stack
  // does not grow with the messages buffered.
  if (delivering_) return;
  delivering_ = true;
  struct Done {
    bool& flag;
    ~Done() { flag = false; }
  } done{delivering_};
  while (!closing_ && !close_when_flushed_ && !paused_at_limit_ && !stopped_) {
    std::optional<msgpack::object_handle> message;
    const std::size_t before = reader_.buffered_bytes();
    try {
      message = reader_.next();
    } catch (const protocol::FrameError& error) {
      events_.on_frame_error(*this, error);
      close();
      return;
    }
    if (!message) return;
    const std::size_t bytes = before - std::min(before, reader_.buffered_bytes());
    last_activity_ = std::chrono::steady_clock::now();
    // A message completed: whatever follows it in the buffer is a new one, with its own time.
    incomplete_since_.reset();
    // Its bytes move from the read buffer's charge to the message's: charged first, released
    // second, so that the budget never shows them free in between (another worker's
    // connection read into that gap and took the agent past its budget: issue 16).
    message_charge_ = MemoryBudget::Charge(meter_, bytes);
    note_buffered();
    events_.on_message(*this, message->get());
    message_charge_ = {};  // not taken by a call: the message is done with
  }
}

void Connection::send(std::string_view bytes) {
  if (closing_) return;
  if (queued_.size() + writing_bytes_ + bytes.size() > limits_.max_write_buffer_bytes) {
    // The client does not read its answers: drop it rather than buffer without bound.
    events_.on_slow_reader(*this);
    close();
    return;
  }
  queued_.append(bytes);
  note_queued();
  if (!flush_scheduled_) {
    flush_scheduled_ = true;
    events_.on_output_pending(*this);
  }
}

void Connection::flush() {
  flush_scheduled_ = false;
  if (closing_ || write_in_progress_) return;  // on_write continues
  if (!queued_.empty()) {
    uv_buf_t buf = uv_buf_init(queued_.data(), static_cast<unsigned>(queued_.size()));
    const int written = uv_try_write(pipe_.stream(), &buf, 1);
    std::size_t done = 0;
    if (written > 0) {
      done = static_cast<std::size_t>(written);
    } else if (written != UV_EAGAIN && written != UV_ENOSYS) {
      close();
      return;
    }
    if (done < queued_.size()) {
      auto request = std::make_unique<WriteRequest>();
      request->data.assign(queued_, done);
      request->req.data = this;
      queued_.clear();
      uv_buf_t rest =
          uv_buf_init(request->data.data(), static_cast<unsigned>(request->data.size()));
      if (uv_write(&request->req, pipe_.stream(), &rest, 1, on_write) != 0) {
        close();
        return;
      }
      writing_bytes_ = request->data.size();
      write_in_progress_ = true;
      request.release();  // owned by libuv until on_write
      note_queued();
      return;
    }
    queued_.clear();
    note_queued();
  }
  if (close_when_flushed_) close_after_flush();
}

void Connection::on_write(uv_write_t* req, int status) {
  std::unique_ptr<WriteRequest> request(reinterpret_cast<WriteRequest*>(req));
  auto* self = static_cast<Connection*>(req->data);
  self->write_in_progress_ = false;
  self->writing_bytes_ = 0;
  self->note_queued();
  if (status != 0) {
    self->close();  // also a write cancelled by close(): then this does nothing
    return;
  }
  self->flush();
}

void Connection::close_after_flush() {
  if (closing_) return;
  if (!close_when_flushed_) close_requested_at_ = std::chrono::steady_clock::now();
  close_when_flushed_ = true;
  update_reading();
  if (write_in_progress_) return;  // on_write comes back here through flush()
  if (!queued_.empty()) {
    flush();  // comes back here when done
    return;
  }
  if (std::exchange(shutdown_sent_, true)) return;
  auto* request = new uv_shutdown_t{};  // freed in on_shutdown
  request->data = this;
  if (uv_shutdown(request, pipe_.stream(), on_shutdown) != 0) {
    delete request;
    close();
  }
}

void Connection::on_shutdown(uv_shutdown_t* req, int) {
  std::unique_ptr<uv_shutdown_t> request(req);
  static_cast<Connection*>(req->data)->close();
}

void Connection::close() {
  if (closing_) return;
  closing_ = true;
  reading_ = false;
  queued_.clear();
  note_queued();
  read_charge_.resize(0);
  events_.on_closing(*this);
  pipe_.close([this] { events_.on_closed(*this); });
}

}  // namespace hsm::agent
