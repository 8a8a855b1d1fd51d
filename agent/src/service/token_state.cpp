#include "service/token_state.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <utility>

#include "keys/algorithm_support.hpp"
#include "keys/key_store.hpp"
#include "metrics/agent_metrics.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/module.hpp"
#include "pkcs11/token.hpp"

namespace hsm::agent {
namespace {

constexpr std::chrono::milliseconds kProbeSessionWait{5000};

}  // namespace

TokenGeneration::TokenGeneration() = default;
TokenGeneration::~TokenGeneration() = default;

TokenState::TokenState(HsmConfig config, AgentMetrics& metrics)
    : metrics_(metrics),
      library_(std::make_shared<const pkcs11::Library>(config.module_path)),
      selector_{config.token_label, config.slot_index},
      pin_(std::move(config.pin)),
      read_only_(config.read_only),
      object_changes_(config.object_changes),
      pool_options_{.min_sessions = config.sessions,
                    .max_sessions = config.max_sessions,
                    .idle_timeout = config.session_idle_timeout} {}

TokenState::~TokenState() {
  close();
}

std::unique_ptr<TokenState> TokenState::open(HsmConfig config, AgentMetrics& metrics) {
  const std::string module_path = config.module_path;
  // Not make_unique: the constructor is private.
  std::unique_ptr<TokenState> state(new TokenState(std::move(config), metrics));
  try {
    auto generation = state->build_generation();
    {
      auto lease = generation->pool->acquire(kProbeSessionWait);
      if (!lease) throw StartupError("no PKCS#11 session for the mechanism probe");
      state->support_ = std::make_unique<keys::AlgorithmSupport>(
          keys::AlgorithmSupport::probe(*generation->token, lease->session()));
    }
    generation->keys = std::make_unique<keys::KeyStore>(*state->support_);
    state->description_ = generation->token->description();
    state->publish(std::move(generation));
  } catch (const StartupError&) {
    throw;
  } catch (const pkcs11::Pkcs11Error& e) {
    throw StartupError("cannot open the token in " + module_path + ": " + e.what());
  }
  return state;
}

std::unique_ptr<TokenGeneration> TokenState::build_generation() {
  auto generation = std::make_unique<TokenGeneration>();
  generation->number = ++generations_built_;
  generation->module = std::make_unique<pkcs11::Module>(library_, metrics_.pkcs11);
  generation->token =
      std::make_unique<pkcs11::Token>(*generation->module, selector_, pin_, read_only_);
  // Decided before any session is shared between threads (the setting is not synchronised).
  const bool serialize =
      object_changes_ == ObjectChanges::kSerialized ||
      (object_changes_ == ObjectChanges::kAuto &&
       pkcs11::needs_serialized_object_changes(generation->token->description()));
  generation->module->serialize_object_changes(serialize);
  if (serialize && generation->number == 1) {
    spdlog::info(
        "token '{}' ({}): key generation and deletion run alone, apart from signing and "
        "lookups (--object-changes)",
        generation->token->description().label, generation->token->description().model);
  }
  generation->pool =
      std::make_unique<pkcs11::SessionPool>(*generation->token, pool_options_, metrics_.pkcs11);
  // open() probes the mechanisms first and adds the KeyStore itself.
  if (support_) generation->keys = std::make_unique<keys::KeyStore>(*support_);
  return generation;
}

void TokenState::publish(std::unique_ptr<TokenGeneration> generation) {
  // The users' references share one control block whose deleter frees nothing: the generation
  // stays owned by owned_ and is torn down by reinitialise() or close(), on their thread. Made
  // outside the lock: if it throws (bad_alloc), the deleter runs at once and takes the lock.
  TokenGeneration* raw = generation.get();
  std::shared_ptr<TokenGeneration> users(raw, [this](TokenGeneration*) noexcept {
    {
      std::lock_guard lock(mutex_);
      users_left_ = false;
    }
    drained_.notify_all();
  });
  std::lock_guard lock(mutex_);
  // published_ is null here (only a down token is published again), so no user reference is
  // dropped under the lock, where its deleter would deadlock.
  owned_ = std::move(generation);
  users_left_ = true;
  published_ = std::move(users);
  fault_.reset();
  down_.store(false, std::memory_order_release);
}

std::shared_ptr<TokenGeneration> TokenState::acquire() const {
  if (down_.load(std::memory_order_acquire)) return nullptr;
  std::lock_guard lock(mutex_);
  return published_;
}

std::optional<TokenFault> TokenState::fault() const {
  std::lock_guard lock(mutex_);
  return fault_;
}

std::uint64_t TokenState::generation_number() const {
  std::lock_guard lock(mutex_);
  return published_ ? published_->number : 0;
}

void TokenState::set_down_listener(std::function<void()> listener) {
  std::lock_guard lock(mutex_);
  down_listener_ = std::move(listener);
}

bool TokenState::mark_down(std::uint64_t generation, std::string reason,
                           std::optional<std::string> ckr) {
  std::shared_ptr<TokenGeneration> retired;
  std::function<void()> listener;
  {
    std::lock_guard lock(mutex_);
    if (!published_ || published_->number != generation) return false;
    retired = std::move(published_);
    down_.store(true, std::memory_order_release);
    fault_ = TokenFault{reason, std::move(ckr), std::chrono::steady_clock::now()};
    listener = down_listener_;
  }
  spdlog::warn("token down (generation {}): {}; re-initialising in the background", generation,
               reason);
  // Requests waiting for a session of this generation answer now instead of at their deadline.
  retired->pool->close();
  retired.reset();  // may be the last user: then the deleter records it (outside our lock)
  if (listener) listener();
  return true;
}

bool TokenState::wait_drained(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds wait) {
  return drained_.wait_for(lock, wait, [this] { return !users_left_; });
}

Recovery TokenState::reinitialise(std::chrono::milliseconds drain_wait) {
  {
    std::unique_lock lock(mutex_);
    if (closed_) return {Recovery::Result::kClosed, "the agent is shutting down"};
    if (pin_rejected_) return {Recovery::Result::kPinRejected, "the PIN was refused"};
    if (published_) return {Recovery::Result::kAlreadyUp, {}};
    if (!wait_drained(lock, drain_wait)) {
      return {Recovery::Result::kBusy,
              "waiting for PKCS#11 calls still in progress on the failed token to return"};
    }
  }
  // Nobody holds the retired generation, so no thread is inside the library (rule 3): its
  // teardown may C_Finalize. The old state cannot be kept through the rebuild: C_Initialize
  // refuses while the library is initialised, and a finalised library's handles are dead.
  if (owned_) {
    const std::uint64_t number = owned_->number;
    owned_.reset();  // KeyStore, sessions, C_Logout + anchor session, C_Finalize
    spdlog::debug("token generation {} torn down", number);
  }
  // Build the next generation in locals and publish it last. A failure halfway (C_Initialize
  // refused, the token not found, the login or a session refused) destroys the locals in
  // reverse order (sessions, login, C_Finalize) and leaves the published state as it was:
  // down, with its reason, so requests keep answering hsm_unavailable and never see a pool
  // without a login or a handle cache over a finalised library.
  try {
    std::unique_ptr<TokenGeneration> next = build_generation();
    const auto& found = next->token->description();
    if (found.serial != description_.serial) {
      spdlog::warn("the token labelled '{}' now has serial {} (was {}): a different token",
                   found.label, found.serial, description_.serial);
    }
    const std::uint64_t number = next->number;
    publish(std::move(next));
    return {Recovery::Result::kRecovered, "generation " + std::to_string(number)};
  } catch (const pkcs11::PinRejectedError& e) {
    // The refusal replaces the fault that took the token down as the reason it is down: it is
    // what every answer, /readyz and the log must name from now on, until a restart.
    std::string reason =
        std::string("the token refused the PIN when logging in again (") + e.what() + ")";
    std::lock_guard lock(mutex_);
    pin_rejected_ = true;
    fault_ = TokenFault{reason, std::string{e.ckr()}, std::chrono::steady_clock::now(),
                        /*until_restart=*/true};
    return {Recovery::Result::kPinRejected, std::move(reason)};
  } catch (const std::exception& e) {
    // StartupError (token not found, login refused for another reason) or Pkcs11Error.
    return {Recovery::Result::kFailed, e.what()};
  }
}

ProbeResult TokenState::probe() const {
  ProbeResult result;
  const std::shared_ptr<TokenGeneration> generation = acquire();
  if (!generation) return result;
  result.ran = true;
  result.generation = generation->number;
  const auto start = std::chrono::steady_clock::now();
  try {
    const CK_SESSION_INFO info = generation->token->anchor_session_info();
    if (!pkcs11::Token::has_user_login(info)) {
      result.error = "the login is gone (anchor session state " + std::to_string(info.state) + ")";
    } else if (generation->pool->usable_sessions() == 0) {
      result.error = "no usable PKCS#11 session: every session was lost and none could be reopened";
    } else {
      result.ok = true;
    }
  } catch (const pkcs11::Pkcs11Error& e) {
    result.error = e.what();
    result.ckr = std::string{e.ckr()};
  } catch (const std::exception& e) {
    result.error = e.what();
  }
  result.duration = std::chrono::steady_clock::now() - start;
  return result;
}

void TokenState::close(std::chrono::milliseconds drain_wait) noexcept {
  std::shared_ptr<TokenGeneration> retired;
  {
    std::lock_guard lock(mutex_);
    if (closed_) return;
    closed_ = true;
    retired = std::move(published_);
    down_.store(true, std::memory_order_release);
    if (!fault_) {
      fault_ =
          TokenFault{"the agent is shutting down", std::nullopt, std::chrono::steady_clock::now()};
    }
  }
  if (retired) retired->pool->close();
  retired.reset();
  std::unique_lock lock(mutex_);
  if (!wait_drained(lock, drain_wait)) {
    // Finalising under a call in progress is undefined behaviour; leaving the library
    // initialised at exit is harmless.
    spdlog::warn("PKCS#11 calls still in progress at shutdown: the token is not finalised");
    (void)owned_.release();  // NOLINT: deliberately leaked, see above
    return;
  }
  lock.unlock();
  owned_.reset();  // sessions, then logout and the anchor session, then C_Finalize
}

}  // namespace hsm::agent
