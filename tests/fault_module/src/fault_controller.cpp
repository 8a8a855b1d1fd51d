#include "fault_controller.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <thread>
#include <utility>

#include "stderr_report.hpp"

namespace hsm::fault {
namespace {

// How often a hung call re-checks the control file for its rule's removal.
constexpr std::chrono::milliseconds kHangRecheck{2};

std::int64_t monotonic_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::int64_t to_ns(const timespec& time) noexcept {
  return static_cast<std::int64_t>(time.tv_sec) * 1'000'000'000 + time.tv_nsec;
}

/// Reads at most `limit` bytes of `path` (a larger file is cut; the parser reports it).
/// nullopt when the file cannot be opened or read.
std::optional<std::string> read_bounded(const std::string& path, std::size_t limit) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return std::nullopt;
  }
  std::string text(limit + 1, '\0');
  std::size_t filled = 0;
  while (filled < text.size()) {
    const ssize_t got = ::read(fd, text.data() + filled, text.size() - filled);
    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got < 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      return std::nullopt;
    }
    if (got == 0) {
      break;
    }
    filled += static_cast<std::size_t>(got);
  }
  ::close(fd);
  text.resize(filled);
  return text;
}

}  // namespace

FaultController::FaultController(std::string control_path, std::chrono::microseconds poll_interval)
    : control_path_(std::move(control_path)),
      poll_interval_ns_(
          std::chrono::duration_cast<std::chrono::nanoseconds>(poll_interval).count()),
      rules_(std::make_shared<const RuleSet>()) {}

void FaultController::poll() noexcept {
  if (control_path_.empty()) {
    return;
  }
  if (poll_interval_ns_ == 0) {
    // Every call must see what was written before it. A re-read already under way may have
    // stat()ed the file before that write, so wait for it and check again ourselves (a stat()
    // when nothing changed) instead of going on with the rules it has not replaced yet.
    std::unique_lock lock(reload_mutex_);
    reload_if_changed(lock);
    return;
  }
  const std::int64_t now = monotonic_ns();
  std::int64_t due = next_poll_ns_.load(std::memory_order_relaxed);
  if (now < due) {
    return;
  }
  // One caller per interval does the stat(); the others carry on with the current rules.
  if (!next_poll_ns_.compare_exchange_strong(due, now + poll_interval_ns_,
                                             std::memory_order_relaxed)) {
    return;
  }
  std::unique_lock lock(reload_mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    // Someone is re-reading right now. With a poll interval the rules may lag a change by
    // about that long anyway, so do not wait for it.
    return;
  }
  reload_if_changed(lock);
}

void FaultController::reload_if_changed(const std::unique_lock<std::mutex>& /*held*/) noexcept {
  FileIdentity now;
  struct stat info {};
  if (::stat(control_path_.c_str(), &info) == 0) {
    now = {true, info.st_dev, info.st_ino, info.st_size, to_ns(info.st_mtim), to_ns(info.st_ctim)};
  } else if (const int error = errno; error != ENOENT && file_.exists) {
    report("cannot stat HSM_FAULT_CONTROL=" + control_path_ + ": " + errno_text(error) +
           "; no faults until it is readable");
  }
  if (now == file_) {
    return;
  }
  file_ = now;
  try {
    std::optional<std::string> text;
    if (now.exists) {
      text = read_bounded(control_path_, kMaxControlFileBytes);
      if (!text) {
        report("cannot read HSM_FAULT_CONTROL=" + control_path_ + ": " + errno_text(errno) +
               "; no faults until it is readable");
      }
    }
    install(text.value_or(std::string{}));
  } catch (...) {
    // Out of memory while parsing: keep the rules we had; the next change retries.
    report("cannot parse HSM_FAULT_CONTROL=" + control_path_ + "; keeping the previous rules");
  }
}

void FaultController::install(const std::string& text) {
  ParsedControl parsed = parse_control_text(text);
  for (const std::string& error : parsed.errors) {
    report("HSM_FAULT_CONTROL=" + control_path_ + " " + error);
  }

  // Carry each unchanged line's state over so its remaining count and session binding survive
  // the re-read; states of lines that left the file are retired below.
  std::map<std::string, std::shared_ptr<RuleState>> previous;
  for (const ActiveRule& rule : *snapshot()) {
    previous.emplace(rule.key, rule.state);
  }

  auto next = std::make_shared<RuleSet>();
  next->reserve(parsed.rules.size());
  std::map<std::string, std::size_t> occurrences;
  for (RuleSpec& spec : parsed.rules) {
    std::string key = spec.identity + '\n' + std::to_string(occurrences[spec.identity]++);
    std::shared_ptr<RuleState> state;
    if (auto it = previous.find(key); it != previous.end()) {
      state = std::move(it->second);
      previous.erase(it);
    } else {
      state = std::make_shared<RuleState>(spec.count);
    }
    next->push_back({std::move(spec), std::move(key), std::move(state)});
  }

  const bool any = !next->empty();
  {
    std::lock_guard lock(rules_mutex_);
    rules_ = std::move(next);
  }
  armed_.store(any, std::memory_order_release);
  for (auto& [key, state] : previous) {
    state->retired.store(true, std::memory_order_release);
  }
}

std::shared_ptr<const FaultController::RuleSet> FaultController::snapshot() const {
  std::lock_guard lock(rules_mutex_);
  return rules_;
}

bool FaultController::session_matches(const ActiveRule& rule,
                                      std::optional<CK_SESSION_HANDLE> session) noexcept {
  switch (rule.spec.session.mode) {
    case SessionFilter::Mode::kAny:
      return true;
    case SessionFilter::Mode::kHandle:
      return session && *session == rule.spec.session.handle;
    case SessionFilter::Mode::kFirst: {
      if (!session || *session == CK_INVALID_HANDLE) {
        return false;
      }
      CK_SESSION_HANDLE bound = rule.state->bound_session.load(std::memory_order_acquire);
      if (bound == CK_INVALID_HANDLE && rule.state->bound_session.compare_exchange_strong(
                                            bound, *session, std::memory_order_acq_rel)) {
        return true;
      }
      return bound == *session;  // on a failed exchange `bound` holds the winner
    }
  }
  return false;
}

bool FaultController::consume(const ActiveRule& rule) noexcept {
  if (!rule.spec.count) {
    return true;  // until the line is removed
  }
  std::uint64_t left = rule.state->remaining.load(std::memory_order_relaxed);
  while (left > 0) {
    if (rule.state->remaining.compare_exchange_weak(left, left - 1, std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}

std::optional<Fault> FaultController::take_fault(
    FunctionId function, std::optional<CK_SESSION_HANDLE> session) noexcept {
  const std::shared_ptr<const RuleSet> rules = snapshot();
  for (const ActiveRule& rule : *rules) {
    if (!rule.spec.matches(function) || !session_matches(rule, session) || !consume(rule)) {
      continue;
    }
    Fault fault;
    fault.rv = rule.spec.rv;
    fault.delay = rule.spec.delay;
    if (rule.spec.hang) {
      fault.hang = rule.state;
    }
    fault.finalize_epoch = finalize_epoch_.load(std::memory_order_acquire);
    return fault;
  }
  return std::nullopt;
}

FaultController::HangEnd FaultController::wait_while_hung(const Fault& fault) noexcept {
  while (true) {
    if (fault.hang == nullptr || fault.hang->retired.load(std::memory_order_acquire)) {
      return HangEnd::kCleared;
    }
    if (finalize_epoch_.load(std::memory_order_acquire) != fault.finalize_epoch) {
      return HangEnd::kFinalized;
    }
    std::this_thread::sleep_for(kHangRecheck);
    std::unique_lock lock(reload_mutex_);
    reload_if_changed(lock);
  }
}

void FaultController::release_hung_calls() noexcept {
  finalize_epoch_.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace hsm::fault
