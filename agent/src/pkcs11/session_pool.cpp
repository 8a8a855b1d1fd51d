#include "pkcs11/session_pool.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "pkcs11/error.hpp"
#include "pkcs11/token.hpp"

namespace hsm::agent::pkcs11 {
namespace {

// The sessions this application may open besides the Token's anchor session, as the token
// states it; nullopt when it states no limit.
std::optional<std::size_t> token_session_limit(const Token& token) {
  const CK_ULONG max = token.info().ulMaxSessionCount;
  if (max == CK_EFFECTIVELY_INFINITE || max == CK_UNAVAILABLE_INFORMATION) return std::nullopt;
  return std::max<std::size_t>(max, 2) - 1;
}

}  // namespace

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(other.pool_), session_(std::move(other.session_)), state_(other.state_) {
  other.session_.reset();
}

SessionPool::Lease::~Lease() {
  if (session_) pool_->release(std::move(*session_), state_);
}

SessionPool::SessionPool(const Token& token, SessionPoolOptions options, Pkcs11Stats& stats)
    : token_(token), stats_(stats), options_([&] {
        options.min_sessions = std::max<std::size_t>(options.min_sessions, 1);
        options.max_sessions = std::max(options.max_sessions, options.min_sessions);
        return options;
      }()) {
  limit_ = options_.max_sessions;
  if (const auto token_limit = token_session_limit(token_); token_limit && *token_limit < limit_) {
    spdlog::info("the token allows {} sessions besides the login's: the pool opens at most {}",
                 *token_limit, *token_limit);
    limit_ = *token_limit;
  }
  const std::size_t initial = std::min(options_.min_sessions, limit_);
  idle_.reserve(initial);
  const auto now = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < initial; ++i) {
    try {
      idle_.push_back(IdleSession{token_.open_session(), now});
    } catch (const Pkcs11Error& e) {
      if (e.rv() != CKR_SESSION_COUNT || idle_.empty()) throw;
      std::lock_guard lock(mutex_);
      lower_limit_locked(idle_.size(), "C_OpenSession answered CKR_SESSION_COUNT");
      break;
    }
  }
  {
    std::lock_guard lock(mutex_);
    update_gauges_locked();
  }
  reaper_ = std::jthread([this](std::stop_token stop) { reap_idle(std::move(stop)); });
}

SessionPool::~SessionPool() {
  reaper_.request_stop();
  if (reaper_.joinable()) reaper_.join();
  std::lock_guard lock(mutex_);
  idle_.clear();  // C_CloseSession for each
  stats_.sessions_idle.Set(0);
  stats_.sessions_busy.Set(0);
}

std::size_t SessionPool::limit() const {
  std::lock_guard lock(mutex_);
  return limit_;
}

std::size_t SessionPool::idle() const {
  std::lock_guard lock(mutex_);
  return idle_.size();
}

std::size_t SessionPool::usable_sessions() const {
  std::lock_guard lock(mutex_);
  return idle_.size() + busy_;
}

void SessionPool::close() noexcept {
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
  }
  idle_available_.notify_all();
  reaper_wake_.notify_all();
}

std::optional<SessionPool::Lease> SessionPool::acquire(std::chrono::milliseconds timeout) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
  std::unique_lock lock(mutex_);
  for (;;) {
    if (closed_)
      throw PoolClosedError("the token went down while this request waited for a session");
    if (!idle_.empty()) {
      Session session = std::move(idle_.back().session);
      idle_.pop_back();
      ++busy_;
      update_gauges_locked();
      lock.unlock();
      observe_wait(start);
      return Lease(*this, std::move(session));
    }
    if (open_locked() < limit_) {
      // Grow (or fill a gap left by a lost session): reserve the slot, open outside the lock
      // (C_OpenSession may block on the token). On failure the slot is given back.
      ++opening_;
      lock.unlock();
      std::optional<Session> opened;
      try {
        opened.emplace(token_.open_session());
      } catch (const Pkcs11Error& e) {
        lock.lock();
        --opening_;
        idle_available_.notify_one();  // the slot is free again for another waiter
        // The token holds no more: the limit becomes the sessions open (not those other
        // threads are still opening: the token refuses them too), and this call waits for one.
        const std::size_t open = idle_.size() + busy_;
        if (e.rv() != CKR_SESSION_COUNT || open == 0) throw;
        lower_limit_locked(open, "C_OpenSession answered CKR_SESSION_COUNT");
        continue;
      } catch (...) {
        lock.lock();
        --opening_;
        idle_available_.notify_one();
        throw;
      }
      lock.lock();
      --opening_;
      ++busy_;
      update_gauges_locked();
      lock.unlock();
      observe_wait(start);
      return Lease(*this, std::move(*opened));
    }
    if (idle_available_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        open_locked() >= limit_ && !closed_) {
      lock.unlock();
      observe_wait(start);
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
    if (state != Lease::State::kBroken) {
      idle_.push_back(IdleSession{std::move(session), std::chrono::steady_clock::now()});
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
    bool replace = false;
    {
      std::lock_guard lock(mutex_);
      // This lease still counts in busy_: without it, would the pool fall below its minimum?
      replace = open_locked() - 1 < options_.min_sessions;
    }
    if (replace) {
      try {
        keep.emplace(token_.open_session());
      } catch (const std::exception& e) {
        // A gap: the next acquire() that finds no idle session opens one.
        spdlog::warn("cannot replace a broken PKCS#11 session: {}", e.what());
      }
    }
  }
  {
    std::lock_guard lock(mutex_);
    --busy_;
    if (keep) idle_.push_back(IdleSession{std::move(*keep), std::chrono::steady_clock::now()});
    update_gauges_locked();
  }
  idle_available_.notify_one();
}

void SessionPool::lower_limit_locked(std::size_t limit, const char* why) {
  if (limit >= limit_) return;
  // Once per pool: concurrent refusals each lower the limit a little until it settles.
  if (!limit_logged_) {
    spdlog::warn("{} with {} sessions open: the pool opens no more than that", why, limit);
    limit_logged_ = true;
  }
  limit_ = limit;
  update_gauges_locked();
}

void SessionPool::reap_idle(std::stop_token stop) {
  std::unique_lock lock(mutex_);
  while (!stop.stop_requested() && !closed_) {
    const auto now = std::chrono::steady_clock::now();
    // idle_ is in hand-back order, so the sessions idle longest are at the front.
    std::vector<IdleSession> expired;
    std::size_t count = 0;
    while (count < idle_.size() && open_locked() - count > options_.min_sessions &&
           now - idle_[count].since >= options_.idle_timeout) {
      ++count;
    }
    if (count > 0) {
      expired.reserve(count);
      std::move(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(count),
                std::back_inserter(expired));
      idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(count));
      update_gauges_locked();
      lock.unlock();
      spdlog::debug("closing {} PKCS#11 sessions idle for {} ms", count,
                    options_.idle_timeout.count());
      expired.clear();  // C_CloseSession for each, outside the lock
      lock.lock();
      continue;
    }
    // Next look: when the session idle longest times out, or one timeout from now (a session
    // handed back later cannot time out sooner).
    const auto next = idle_.empty() || open_locked() <= options_.min_sessions
                          ? now + options_.idle_timeout
                          : idle_.front().since + options_.idle_timeout;
    (void)reaper_wake_.wait_until(lock, stop, next, [this] { return closed_; });
  }
}

void SessionPool::observe_wait(std::chrono::steady_clock::time_point start) noexcept {
  stats_.session_wait_seconds.Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

void SessionPool::update_gauges_locked() noexcept {
  stats_.sessions_idle.Set(static_cast<double>(idle_.size()));
  stats_.sessions_busy.Set(static_cast<double>(busy_));
  stats_.sessions_limit.Set(static_cast<double>(limit_));
}

}  // namespace hsm::agent::pkcs11
