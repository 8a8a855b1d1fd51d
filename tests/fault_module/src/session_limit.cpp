#include "session_limit.hpp"

namespace hsm::fault {

std::optional<CK_RV> SessionLimit::reserve() {
  if (!max_) return std::nullopt;
  std::lock_guard lock(mutex_);
  if (open_ >= *max_) return CKR_SESSION_COUNT;
  ++open_;
  return std::nullopt;
}

void SessionLimit::opened(CK_RV rv) {
  if (!max_ || rv == CKR_OK) return;
  std::lock_guard lock(mutex_);
  if (open_ > 0) --open_;
}

void SessionLimit::closed() {
  if (!max_) return;
  std::lock_guard lock(mutex_);
  if (open_ > 0) --open_;
}

void SessionLimit::reset() {
  if (!max_) return;
  std::lock_guard lock(mutex_);
  open_ = 0;
}

void SessionLimit::state(CK_TOKEN_INFO& info) const {
  if (max_) info.ulMaxSessionCount = *max_;
}

}  // namespace hsm::fault
