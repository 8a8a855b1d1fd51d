#include "log/audit_log.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string_view>
#include <utility>

#include "log/json_text.hpp"

namespace hsm::agent {
namespace {

/// Opens the audit file for append, created 0600 (audit lines name callers and keys); "-" is
/// stdout. Throws std::runtime_error naming the path.
int open_output(const std::string& path) {
  if (path == "-") return STDOUT_FILENO;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw std::runtime_error("cannot open audit log " + path + ": " + std::strerror(errno));
  }
  return fd;
}

void append_time(std::string& out) {
  const auto now = std::chrono::system_clock::now();
  const auto seconds = std::chrono::system_clock::to_time_t(now);
  const auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() %
      1'000'000;
  std::tm utc{};
  ::gmtime_r(&seconds, &utc);
  char text[40];
  const auto n = std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%S", &utc);
  std::snprintf(text + n, sizeof(text) - n, ".%06lldZ", static_cast<long long>(micros));
  out += text;
}

void append_hex(std::string& out, const std::array<std::uint8_t, 32>& bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (auto b : bytes) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 0xF]);
  }
}

bool is_regular_file(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

std::uint64_t lines_in(std::string_view bytes) {
  return static_cast<std::uint64_t>(std::count(bytes.begin(), bytes.end(), '\n'));
}

std::string describe_write_error(int error) {
  return error == 0 ? std::string("a write made no progress") : std::string(std::strerror(error));
}

}  // namespace

AuditLog::AuditLog(std::string path, AuditOptions options, AgentMetrics& metrics,
                   HealthState& health)
    : path_(std::move(path)),
      options_(options),
      metrics_(metrics),
      health_(health),
      fd_(open_output(path_)),
      truncatable_(is_regular_file(fd_)) {
  writer_ = std::thread([this] { run_writer(); });
}

AuditLog::~AuditLog() {
  close();
  if (fd_ != STDOUT_FILENO) ::close(fd_);
}

bool AuditLog::key_operation(protocol::Method method) noexcept {
  using protocol::Method;
  switch (method) {
    case Method::kGenerateKey:
    case Method::kSign:
    case Method::kVerify:
    case Method::kDeleteKey:
    case Method::kSignBatch:
      return true;
    default:
      return false;
  }
}

bool AuditLog::audited(protocol::Method method, std::optional<protocol::ErrorCode> code) noexcept {
  return code.has_value() || key_operation(method);  // every denied or failed request
}

std::string AuditLog::format(const AuditRecord& record) {
  std::string line;
  line.reserve(320);
  line += R"({"time":")";
  append_time(line);
  line += R"(","event":"request","method":)";
  append_json_string(line, protocol::to_string(record.method));
  line += R"(,"kid":)";
  append_json_string(line, record.kid);
  if (!record.alg.empty()) {
    line += R"(,"alg":)";
    append_json_string(line, record.alg);
  }
  line += R"(,"result":)";
  append_json_string(line, record.code ? protocol::to_string(*record.code) : "ok");
  char numbers[160];
  std::snprintf(numbers, sizeof(numbers),
                R"(,"duration_ms":%.3f,"peer":{"pid":%d,"uid":%u,"gid":%u})",
                record.duration_seconds * 1000.0, static_cast<int>(record.caller.pid),
                static_cast<unsigned>(record.caller.uid), static_cast<unsigned>(record.caller.gid));
  line += numbers;
  if (record.input_sha256) {
    line += R"(,"input_sha256":")";
    append_hex(line, *record.input_sha256);
    line += '"';
  }
  if (record.method == protocol::Method::kSignBatch) {
    // One entry per item, in request order; an item's result is its own (a batch answered ok
    // can hold failed items), or the batch's code when the batch was refused as a whole.
    line += R"(,"items":[)";
    bool first = true;
    for (const auto& item : record.items) {
      if (!first) line += ',';
      first = false;
      line += R"({"kid":)";
      append_json_string(line, item.kid);
      line += R"(,"result":)";
      append_json_string(line, item.code ? protocol::to_string(*item.code) : "ok");
      if (item.input_sha256) {
        line += R"(,"input_sha256":")";
        append_hex(line, *item.input_sha256);
        line += '"';
      }
      line += '}';
    }
    line += ']';
  }
  line += '}';
  return line;
}

void AuditLog::record(const AuditRecord& record) {
  append(format(record));
}

void AuditLog::record_refused_connections(const Caller& caller, std::uint64_t count,
                                          bool other_uids) {
  std::string line = R"({"time":")";
  append_time(line);
  char rest[200];
  std::snprintf(rest, sizeof(rest),
                R"(","event":"connection_refused","result":"permission_denied","count":%llu,)"
                R"("peer":{"pid":%d,"uid":%u,"gid":%u}%s})",
                static_cast<unsigned long long>(count), static_cast<int>(caller.pid),
                static_cast<unsigned>(caller.uid), static_cast<unsigned>(caller.gid),
                other_uids ? R"(,"other_uids":true)" : "");
  line += rest;
  append(std::move(line));
}

void AuditLog::append(std::string&& line) {
  line += '\n';
  std::unique_lock lock(mutex_);
  if (closed_) {
    // After close() (an exit path): no writer thread; write on the caller's thread.
    lock.unlock();
    std::lock_guard output(output_mutex_);
    write_synchronously(line);
    return;
  }
  if (pending_.size() + in_flight_bytes_ + line.size() > options_.max_pending_bytes) {
    // Never wait for the writer: the caller may be the event loop.
    drop(1);
    set_failing("its writer cannot keep up (" + std::to_string(options_.max_pending_bytes / 1024) +
                " KiB of lines waiting)");
    return;
  }
  const bool was_empty = pending_.empty();
  pending_ += line;
  ++appended_;
  const bool wake = was_empty || pending_.size() >= kWakeBytes;
  lock.unlock();
  // Waking only on empty -> non-empty keeps a busy agent at one wake-up per batch.
  if (wake) wake_writer_.notify_one();
}

void AuditLog::run_writer() {
  std::string batch;
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_writer_.wait(lock, [&] { return stopping_ || !pending_.empty() || reopen_at_ || retry_; });
    // Stopping with nothing left; a retry with no line pending only completes a cut line, which
    // the exit does not wait for.
    if (pending_.empty() && !reopen_at_ && (stopping_ || !retry_)) return;
    if (!stopping_ && !retry_ && flush_waiters_ == 0 && !reopen_at_ &&
        pending_.size() < kWakeBytes) {
      // Let the lines of the next few milliseconds join this write.
      wake_writer_.wait_for(lock, kBatchWindow, [&] {
        return stopping_ || flush_waiters_ > 0 || reopen_at_ || pending_.size() >= kWakeBytes;
      });
    }
    const bool retrying = retry_;
    // Lines recorded before a reopen() belong to the old file: this batch ends with them.
    const bool reopen = reopen_at_.has_value();
    const std::size_t take = reopen ? *reopen_at_ : pending_.size();
    reopen_at_.reset();
    if (take == pending_.size()) {
      batch.swap(pending_);  // pending_ takes the previous batch's capacity
    } else {
      batch.assign(pending_, 0, take);
      pending_.erase(0, take);
    }
    in_flight_bytes_ = batch.size();
    lock.unlock();
    Written result;
    {
      std::lock_guard output(output_mutex_);
      result = write_lines(batch);
      if (reopen) reopen_output();
    }
    lock.lock();
    in_flight_bytes_ = 0;
    written_upto_ += lines_in(std::string_view(batch).substr(0, result.whole_bytes));
    const bool failed = !result.complete;
    retry_ = failed;
    if (failed) {
      // Kept, ahead of the lines recorded since; a pending reopen() still splits them right.
      pending_.insert(0, batch, result.whole_bytes);
      if (reopen_at_) *reopen_at_ += batch.size() - result.whole_bytes;
      set_failing(describe_write_error(result.error));
    } else if (failing_ && (!batch.empty() || retrying)) {
      set_writable();
    }
    batch.clear();
    written_.notify_all();
    if (!failed) continue;
    if (stopping_) {
      // The exit does not wait for a disk to get room: what is left is lost, and said so.
      const auto lost = lines_in(pending_);
      drop(lost);
      pending_.clear();
      reopen_at_.reset();
      spdlog::error("{} audit lines could not be written before the exit", lost);
      written_.notify_all();
      return;
    }
    wake_writer_.wait_for(lock, options_.retry_interval, [&] { return stopping_; });
  }
}

std::size_t AuditLog::write_some(std::string_view bytes, int& error) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd_, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = n < 0 ? errno : 0;
      metrics_.audit_write_errors_total.Increment();
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  return done;
}

AuditLog::Written AuditLog::write_lines(std::string_view lines) {
  Written result;
  // A line an earlier attempt cut on an output that cannot be truncated is completed first.
  if (!torn_tail_.empty()) {
    torn_tail_.erase(0, write_some(torn_tail_, result.error));
    if (!torn_tail_.empty()) return result;
  }
  const std::size_t written = write_some(lines, result.error);
  if (written == lines.size()) {
    result.whole_bytes = written;
    result.complete = true;
    return result;
  }
  const auto last_newline = written == 0 ? std::string_view::npos : lines.rfind('\n', written - 1);
  result.whole_bytes = last_newline == std::string_view::npos ? 0 : last_newline + 1;
  if (result.whole_bytes == written) return result;
  // Part of a line is in the output. Cut it away (the line is written again, whole, next time),
  // or where that is impossible, keep its rest to complete it first next time (the line then
  // counts as written).
  if (truncatable_) {
    const off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end >= 0 && ::ftruncate(fd_, end - static_cast<off_t>(written - result.whole_bytes)) == 0) {
      return result;
    }
  }
  const std::size_t line_end = lines.find('\n', written) + 1;  // lines end in '\n'
  torn_tail_.assign(lines.substr(written, line_end - written));
  result.whole_bytes = line_end;
  return result;
}

void AuditLog::write_synchronously(std::string_view lines) {
  const Written result = write_lines(lines);
  if (!result.complete) {
    const auto lost = lines_in(lines.substr(result.whole_bytes));
    metrics_.audit_dropped_lines_total.Increment(static_cast<double>(lost));
    spdlog::error("cannot write the audit log {}: {}; {} lines lost",
                  path_ == "-" ? "(stdout)" : path_, describe_write_error(result.error), lost);
  }
}

void AuditLog::reopen_output() {
  int fresh = -1;
  try {
    fresh = open_output(path_);
  } catch (const std::exception& e) {
    spdlog::error("cannot reopen audit log, keeping the old file: {}", e.what());
    return;
  }
  if (!torn_tail_.empty()) {  // the old file's last line, completed if it still can be
    int error = 0;
    (void)write_some(torn_tail_, error);
    torn_tail_.clear();
  }
  if (fd_ != STDOUT_FILENO) ::close(fd_);
  fd_ = fresh;
  truncatable_ = is_regular_file(fd_);
  spdlog::info("audit log reopened: {}", path_);
}

void AuditLog::reopen() {
  if (path_ == "-") return;
  std::unique_lock lock(mutex_);
  if (closed_) {
    lock.unlock();
    std::lock_guard output(output_mutex_);
    reopen_output();
    return;
  }
  // Every line recorded before the reopen belongs to the old file (logrotate moved it and
  // signalled us; what it asked for must be complete there).
  reopen_at_ = pending_.size();
  lock.unlock();
  wake_writer_.notify_one();
}

void AuditLog::flush() {
  std::unique_lock lock(mutex_);
  if (closed_) return;  // written synchronously
  const std::uint64_t target = appended_;
  ++flush_waiters_;
  wake_writer_.notify_one();
  written_.wait(lock, [&] { return written_upto_ >= target || failing_; });
  --flush_waiters_;
}

void AuditLog::close() {
  {
    std::lock_guard lock(mutex_);
    if (closed_ || stopping_) return;
    stopping_ = true;
  }
  wake_writer_.notify_one();
  written_.notify_all();
  // The writer makes one more attempt at everything pending before it returns.
  if (writer_.joinable()) writer_.join();
  std::string leftover;
  bool reopen = false;
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    // Lines appended after the writer's last look: from here on append() writes directly.
    leftover.swap(pending_);
    reopen = reopen_at_.has_value();
    reopen_at_.reset();
    written_upto_ = appended_;
  }
  std::lock_guard output(output_mutex_);
  write_synchronously(leftover);
  if (reopen) reopen_output();
}

void AuditLog::drop(std::uint64_t lines) {
  if (lines == 0) return;
  metrics_.audit_dropped_lines_total.Increment(static_cast<double>(lines));
  dropped_while_failing_ += lines;
}

void AuditLog::set_failing(const std::string& problem) {
  if (failing_) return;
  failing_ = true;
  dropped_while_failing_ = 0;
  refusing_.store(!options_.fail_open, std::memory_order_release);
  metrics_.audit_failing.Set(1);
  const char* consequence = options_.fail_open
                                ? "key operations go on (--audit-fail-open); lines that do not "
                                  "fit the writer's queue are dropped"
                                : "key operations are refused until it can";
  spdlog::error("cannot write the audit log {}: {}; {}", path_ == "-" ? "(stdout)" : path_, problem,
                consequence);
  health_.set_audit_problem("audit log cannot be written (" + problem + "); " + consequence,
                            !options_.fail_open);
}

void AuditLog::set_writable() {
  failing_ = false;
  refusing_.store(false, std::memory_order_release);
  metrics_.audit_failing.Set(0);
  health_.set_audit_problem(std::nullopt, false);
  spdlog::warn("the audit log {} is written again ({} lines dropped meanwhile)",
               path_ == "-" ? "(stdout)" : path_, dropped_while_failing_);
}

}  // namespace hsm::agent
