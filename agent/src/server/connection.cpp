#include "server/connection.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <memory>
#include <string>

namespace hsm::agent {
namespace {

// Bytes offered to each read. Small on purpose: 1,000 idle connections must stay cheap, and a
// request is typically ~100 bytes; a large message is assembled over several reads.
constexpr std::size_t kReadChunkBytes = 8 * 1024;

}  // namespace

Connection::Connection(std::uint64_t id, ConnectionEvents& events, const ConnectionLimits& limits)
    : id_(id),
      events_(events),
      limits_(limits),
      reader_(limits.frame, 1024),
      last_activity_(std::chrono::steady_clock::now()),
      output_(std::make_shared<ConnectionOutput>(limits.max_write_buffer_bytes)) {
  pipe_.data = this;
}

Connection* Connection::accept(uv_stream_t* listener, std::uint64_t id, ConnectionEvents& events,
                               const ConnectionLimits& limits) {
  auto* connection = new Connection(id, events, limits);  // freed in on_close
  if (uv_pipe_init(listener->loop, &connection->pipe_, 0) != 0) {
    delete connection;
    return nullptr;
  }
  if (uv_accept(listener, reinterpret_cast<uv_stream_t*>(&connection->pipe_)) != 0) {
    connection->closing_ = true;
    // Not yet known to the owner: close without telling it.
    uv_close(reinterpret_cast<uv_handle_t*>(&connection->pipe_),
             [](uv_handle_t* handle) { delete static_cast<Connection*>(handle->data); });
    return nullptr;
  }
  connection->read_peer_credentials();
  return connection;
}

void Connection::read_peer_credentials() {
  uv_os_fd_t fd = -1;
  if (uv_fileno(reinterpret_cast<uv_handle_t*>(&pipe_), &fd) != 0) return;
  ucred credentials{};
  socklen_t size = sizeof(credentials);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &size) == 0) {
    caller_ = Caller{credentials.pid, credentials.uid, credentials.gid};
  }
  output_->attach(fd);
}

void Connection::charge_to(MemoryBudget& budget, std::shared_ptr<MemoryBudget::Meter> meter) {
  budget_ = &budget;
  meter_ = std::move(meter);
  read_charge_ = MemoryBudget::Charge(meter_, reader_.buffered_bytes());
  output_->charge_to(meter_);
}

bool Connection::start() {
  if (uv_read_start(reinterpret_cast<uv_stream_t*>(&pipe_), on_alloc, on_read) != 0) {
    close();
    return false;
  }
  reading_ = true;
  return true;
}

void Connection::read_again() {
  if (!waiting_for_memory_) return;
  waiting_for_memory_ = false;
  if (closing_ || close_when_flushed_ || paused_ || reading_) return;
  (void)start();
}

bool Connection::peer_hung_up() const {
  uv_os_fd_t fd = -1;
  if (uv_fileno(reinterpret_cast<const uv_handle_t*>(&pipe_), &fd) != 0) return false;
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

void Connection::pause() {
  paused_ = true;
  if (reading_) {
    uv_read_stop(reinterpret_cast<uv_stream_t*>(&pipe_));
    reading_ = false;
  }
}

void Connection::resume() {
  // A connection closing after its flush reads no more, whatever answers come back.
  if (closing_ || close_when_flushed_ || !paused_) return;
  paused_ = false;
  // The time paused was the agent's doing: an incomplete message's read timeout starts again.
  if (incomplete_since_) incomplete_since_ = std::chrono::steady_clock::now();
  deliver_messages();  // may pause again
  if (!paused_ && !closing_ && !reading_) (void)start();
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
    const auto size = std::min(span.size(), room);
    *buf = uv_buf_init(span.data(), static_cast<unsigned>(size));
  } catch (const std::exception&) {
    *buf = uv_buf_init(nullptr, 0);  // libuv reports UV_ENOBUFS to on_read
  }
}

void Connection::on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
  auto* self = static_cast<Connection*>(stream->data);
  if (nread == UV_ENOBUFS && self->waiting_for_memory_) {
    // No room in the memory budget: stop reading (libuv would ask again at once) until bytes
    // are released. The client's bytes wait in the kernel.
    uv_read_stop(stream);
    self->reading_ = false;
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
  while (!paused_ && !closing_) {
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
    note_buffered();
    events_.on_message(*this, message->get(), bytes);
  }
}

void Connection::send(std::string_view bytes) {
  if (closing_) return;
  if (!output_->queue(bytes)) {
    close_slow_reader();
    return;
  }
  schedule_flush();
}

void Connection::schedule_flush() {
  if (closing_ || flush_scheduled_) return;
  flush_scheduled_ = true;
  events_.on_output_pending(*this);
}

void Connection::close_slow_reader() {
  if (closing_) return;
  // The client does not read its answers: drop it rather than buffer without bound.
  events_.on_slow_reader(*this);
  close();
}

void Connection::flush() {
  flush_scheduled_ = false;
  if (closing_) return;
  switch (output_->flush(reinterpret_cast<uv_stream_t*>(&pipe_), this, on_write)) {
    case ConnectionOutput::FlushResult::kFailed:
      close();
      return;
    case ConnectionOutput::FlushResult::kWriting:
      return;  // on_write continues
    case ConnectionOutput::FlushResult::kDone:
      break;
  }
  if (close_when_flushed_) close_after_flush();
}

void Connection::on_write(uv_write_t* req, int status) {
  auto* self = static_cast<Connection*>(req->data);
  const bool more = self->output_->finish_write(req);
  if (status != 0) {
    self->close();
    return;
  }
  if (more) {
    self->flush();
  } else if (self->close_when_flushed_) {
    self->close_after_flush();
  }
}

void Connection::close_after_flush() {
  if (closing_) return;
  if (!close_when_flushed_) close_requested_at_ = std::chrono::steady_clock::now();
  close_when_flushed_ = true;
  pause();
  if (!output_->idle()) {
    flush();  // comes back here when done, now or from on_write
    return;
  }
  auto* request = new uv_shutdown_t{};  // freed in on_shutdown
  request->data = this;
  if (uv_shutdown(request, reinterpret_cast<uv_stream_t*>(&pipe_), on_shutdown) != 0) {
    delete request;
    close();
  }
}

void Connection::on_shutdown(uv_shutdown_t* req, int) {
  auto* self = static_cast<Connection*>(req->data);
  delete req;
  self->close();
}

void Connection::close() {
  if (closing_) return;
  closing_ = true;
  output_->close();  // before uv_close closes the descriptor: no worker writes to it any more
  events_.on_closed(*this);
  uv_close(reinterpret_cast<uv_handle_t*>(&pipe_), on_close);
}

void Connection::on_close(uv_handle_t* handle) {
  delete static_cast<Connection*>(handle->data);
}

}  // namespace hsm::agent
