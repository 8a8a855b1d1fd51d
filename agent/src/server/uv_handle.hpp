// uv::Handle<T>: the one owner of a libuv handle (uv_pipe_t, uv_timer_t, uv_async_t, ...), after
// uvw's Handle<T>. It checks the init result (throws uv::Error), has an idempotent close(), and
// keeps the handle's memory alive until libuv's close callback, however early its owner goes:
// an owner may drop a Handle from inside one of the handle's own callbacks.
//
// The handle's `data` field is its owner's (callbacks find their object through it); the Handle
// finds its storage from the handle's address.
//
// Thread-safety: a libuv handle belongs to its loop; use a Handle only on the thread that runs
// that loop (uv_async_send is the one libuv call that any thread may make).
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#if defined(__SANITIZE_THREAD__)
// From ThreadSanitizer's runtime (<sanitizer/linux_syscall_hooks.h>, which Debian's GCC does not
// ship): records a close(2) that the runtime did not intercept.
extern "C" void __sanitizer_syscall_pre_impl_close(long fd);  // NOLINT
#endif

namespace hsm::agent::uv {

/// A libuv call failed; `code` is libuv's negative error code.
class Error : public std::runtime_error {
 public:
  Error(std::string_view what, int code)
      : std::runtime_error(std::string(what) + ": " + uv_strerror(code)), code_(code) {}
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

/// Throws uv::Error naming `what` when `rc` is a libuv error.
inline void check(int rc, std::string_view what) {
  if (rc < 0) throw Error(what, rc);
}

/// uv_pipe_init for a Unix socket (not an IPC pipe), in the shape Handle's constructor takes.
inline int init_pipe(uv_loop_t* loop, uv_pipe_t* pipe) {
  return uv_pipe_init(loop, pipe, 0);
}

template <typename T>
class Handle {
 public:
  Handle() noexcept = default;
  /// Allocates the handle and runs `init(loop, handle)` (uv_timer_init and the like); throws
  /// uv::Error naming `what` when it fails (nothing is left to close then).
  template <typename Init>
  Handle(uv_loop_t* loop, Init&& init, std::string_view what) : storage_(new Storage) {
    const int rc = std::forward<Init>(init)(loop, &storage_->raw);
    if (rc < 0) {
      delete storage_;  // libuv does not know a handle whose init failed
      storage_ = nullptr;
      throw Error(what, rc);
    }
  }
  ~Handle() { close(); }
  Handle(Handle&& other) noexcept : storage_(std::exchange(other.storage_, nullptr)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      close();
      storage_ = std::exchange(other.storage_, nullptr);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  /// The handle; nullptr once closed (or never opened).
  [[nodiscard]] T* get() const noexcept { return storage_ ? &storage_->raw : nullptr; }
  T* operator->() const noexcept { return get(); }
  [[nodiscard]] explicit operator bool() const noexcept { return storage_ != nullptr; }
  [[nodiscard]] uv_handle_t* base() const noexcept { return reinterpret_cast<uv_handle_t*>(get()); }
  /// For stream handles (pipes).
  [[nodiscard]] uv_stream_t* stream() const noexcept {
    return reinterpret_cast<uv_stream_t*>(get());
  }

  /// Closes the handle (uv_close); `on_closed`, if any, runs from libuv's close callback, after
  /// every other callback of the handle (a stream's cancelled writes included). Idempotent: a
  /// second close, or one on an empty Handle, does nothing.
  void close(std::function<void()> on_closed = {}) noexcept {
    if (storage_ == nullptr) return;
    Storage* storage = std::exchange(storage_, nullptr);
#if defined(__SANITIZE_THREAD__)
    // libuv closes a descriptor with a raw close syscall (uv__close_nocancel) that
    // ThreadSanitizer does not see, so another thread reusing the number (the metrics thread
    // reading /proc) looked like a race on it. Tell the runtime, as libuv's own TSan builds do.
    uv_os_fd_t fd = -1;
    if (uv_fileno(reinterpret_cast<uv_handle_t*>(&storage->raw), &fd) == 0) {
      __sanitizer_syscall_pre_impl_close(fd);
    }
#endif
    if (on_closed) storage->on_closed = new std::function<void()>(std::move(on_closed));
    uv_close(reinterpret_cast<uv_handle_t*>(&storage->raw), [](uv_handle_t* handle) {
      std::unique_ptr<Storage> owned(reinterpret_cast<Storage*>(handle));
      std::unique_ptr<std::function<void()>> callback(owned->on_closed);
      owned.reset();
      if (callback) (*callback)();
    });
  }

 private:
  // Standard layout, the handle first: the handle's address is the storage's.
  struct Storage {
    T raw{};
    std::function<void()>* on_closed = nullptr;  // owned; set by close()
  };
  static_assert(std::is_standard_layout_v<Storage>);

  Storage* storage_ = nullptr;
};

}  // namespace hsm::agent::uv
