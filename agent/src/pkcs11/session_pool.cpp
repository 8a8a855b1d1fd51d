#include "pkcs11/session_pool.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "metrics/agent_metrics.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/token.hpp"

namespace hsm::agent::pkcs11 {

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(other.pool_), session_(std::move(other.session_)), state_(other.state_) {
  other.session_.reset();
}

SessionPool::Lease::~Lease() {
  if (session_) pool_->release(std::move(*session_), state_);
}

SessionPool::SessionPool(const Token& token, std::size_t size, AgentMetrics& metrics)
    : token_(token), metrics_(metrics), size_(std::max<std::size_t>(size, 1)) {
  idle_.reserve(size_);
  for (std::size_t i = 0; i < size_; ++i) idle_.push_back(token_.open_session());
  std::lock_guard lock(mutex_);
  update_gauges_locked();
}

SessionPool::~SessionPool() {
  std::lock_guard lock(mutex_);
  idle_.clear();  // C_CloseSession for each
  metrics_.sessions_idle.Set(0);
  metrics_.sessions_busy.Set(0);
}

std::size_t SessionPool::idle() const {
  std::lock_guard lock(mutex_);
  return idle_.size();
}

std::size_t SessionPool::usable_sessions() const {
  std::lock_guard lock(mutex_);
  return size_ - missing_;
}

void SessionPool::close() noexcept {
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
  }
  idle_available_.notify_all();
}

std::optional<SessionPool::Lease> SessionPool::acquire(std::chrono::milliseconds timeout) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
  std::unique_lock lock(mutex_);
  for (;;) {
    if (closed_)
      throw PoolClosedError("the token went down while this request waited for a session");
    if (!idle_.empty()) {
      Session session = std::move(idle_.back());
      idle_.pop_back();
      ++busy_;
      update_gauges_locked();
      lock.unlock();
      metrics_.session_wait_seconds.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      return Lease(*this, std::move(session));
    }
    if (missing_ > 0) {
      // Fill a gap left by a session that could not be replaced, outside the lock (it blocks
      // on the token). On failure the gap stays for the next caller and the error propagates.
      --missing_;
      ++busy_;
      lock.unlock();
      try {
        Session session = token_.open_session();
        metrics_.session_wait_seconds.Observe(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        std::lock_guard relock(mutex_);
        update_gauges_locked();
        return Lease(*this, std::move(session));
      } catch (...) {
        std::lock_guard relock(mutex_);
        ++missing_;
        --busy_;
        throw;
      }
    }
    if (idle_available_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        missing_ == 0 && !closed_) {
      metrics_.session_wait_seconds.Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      return std::nullopt;
    }
  }
}

void SessionPool::release(Session session, Lease::State state) noexcept {
  bool closed = false;
  {
    std::lock_guard lock(mutex_);
    closed = closed_;
  }
  if (closed) {
    // The token is down: checking or replacing sessions would only fail against it. Keep what
    // is not known broken; the generation's teardown closes everything.
    std::lock_guard lock(mutex_);
    --busy_;
    if (state == Lease::State::kBroken) {
      ++missing_;
    } else {
      idle_.push_back(std::move(session));
    }
    update_gauges_locked();
    return;  // a broken session is closed here, as `session` goes out of scope
  }
  if (state == Lease::State::kSuspect) {
    try {
      (void)session.info();
      state = Lease::State::kGood;
    } catch (const std::exception& e) {
      spdlog::info("replacing a PKCS#11 session that failed its check: {}", e.what());
      state = Lease::State::kBroken;
    }
  }
  std::optional<Session> keep;
  if (state == Lease::State::kGood) {
    keep.emplace(std::move(session));
  } else {
    { Session discard = std::move(session); }  // C_CloseSession now, before opening another
    try {
      keep.emplace(token_.open_session());
    } catch (const std::exception& e) {
      spdlog::warn("cannot replace a broken PKCS#11 session: {}", e.what());
    }
  }
  {
    std::lock_guard lock(mutex_);
    --busy_;
    if (keep) {
      idle_.push_back(std::move(*keep));
    } else {
      ++missing_;
    }
    update_gauges_locked();
  }
  idle_available_.notify_one();
}

void SessionPool::update_gauges_locked() noexcept {
  metrics_.sessions_idle.Set(static_cast<double>(idle_.size()));
  metrics_.sessions_busy.Set(static_cast<double>(busy_));
}

}  // namespace hsm::agent::pkcs11
