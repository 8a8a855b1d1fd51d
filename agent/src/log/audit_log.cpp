#include "log/audit_log.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string_view>

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

}  // namespace

AuditLog::AuditLog(std::string path) : path_(std::move(path)), fd_(open_output(path_)) {
  writer_ = std::thread([this] { run_writer(); });
}

AuditLog::~AuditLog() {
  close();
  if (fd_ != STDOUT_FILENO) ::close(fd_);
}

bool AuditLog::audited(protocol::Method method, std::optional<protocol::ErrorCode> code) noexcept {
  using protocol::Method;
  if (code) return true;  // every denied or failed request
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

void AuditLog::record_refused_connection(const Caller& caller) {
  std::string line = R"({"time":")";
  append_time(line);
  char rest[160];
  std::snprintf(rest, sizeof(rest),
                R"(","event":"connection_refused","result":"permission_denied",)"
                R"("peer":{"pid":%d,"uid":%u,"gid":%u}})",
                static_cast<int>(caller.pid), static_cast<unsigned>(caller.uid),
                static_cast<unsigned>(caller.gid));
  line += rest;
  append(line);
}

void AuditLog::append(std::string_view line) {
  std::unique_lock lock(mutex_);
  if (closed_) {
    // After close() (an exit path): no writer thread; write on the caller's thread.
    lock.unlock();
    std::string whole(line);
    whole += '\n';
    std::lock_guard output(output_mutex_);
    write_out(whole);
    return;
  }
  // Backpressure: never drop an audit line; the caller waits for the writer instead.
  written_.wait(lock, [&] { return pending_.size() < kMaxPendingBytes || stopping_; });
  const bool was_empty = pending_.empty();
  pending_.append(line);
  pending_ += '\n';
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
    wake_writer_.wait(lock, [&] { return stopping_ || !pending_.empty(); });
    if (pending_.empty()) return;  // stopping, nothing left
    if (!stopping_ && flush_waiters_ == 0 && pending_.size() < kWakeBytes) {
      // Let the lines of the next few milliseconds join this write.
      wake_writer_.wait_for(lock, kBatchWindow, [&] {
        return stopping_ || flush_waiters_ > 0 || pending_.size() >= kWakeBytes;
      });
    }
    batch.swap(pending_);  // pending_ takes the previous batch's capacity
    const std::uint64_t upto = appended_;
    lock.unlock();
    {
      std::lock_guard output(output_mutex_);
      write_out(batch);
    }
    batch.clear();
    lock.lock();
    written_upto_ = upto;
    written_.notify_all();
  }
}

void AuditLog::write_out(std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd_, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      // Disk full, stdout closed: nothing to do but say so (once per file) and go on serving.
      if (!reported_write_error_) {
        reported_write_error_ = true;
        spdlog::error("cannot write the audit log {}: {}", path_ == "-" ? "(stdout)" : path_,
                      n < 0 ? std::strerror(errno) : "no progress");
      }
      return;
    }
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
}

void AuditLog::reopen() {
  if (path_ == "-") return;
  int fresh = -1;
  try {
    fresh = open_output(path_);
  } catch (const std::exception& e) {
    spdlog::error("cannot reopen audit log, keeping the old file: {}", e.what());
    return;
  }
  // Every line recorded before the reopen belongs to the old file (logrotate moved it and
  // signalled us; what it asked for must be complete there). Lines recorded concurrently with
  // the swap may land in either file, but in order: old-file lines all precede new-file ones.
  flush();
  {
    std::lock_guard output(output_mutex_);
    ::close(fd_);
    fd_ = fresh;
    reported_write_error_ = false;
  }
  spdlog::info("audit log reopened: {}", path_);
}

void AuditLog::flush() {
  std::unique_lock lock(mutex_);
  if (closed_) return;  // written synchronously
  const std::uint64_t target = appended_;
  ++flush_waiters_;
  wake_writer_.notify_one();
  written_.wait(lock, [&] { return written_upto_ >= target; });
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
  // The writer writes everything pending before it returns.
  if (writer_.joinable()) writer_.join();
  std::string leftover;
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    // Lines appended after the writer's last look: from here on append() writes directly.
    leftover.swap(pending_);
    written_upto_ = appended_;
  }
  std::lock_guard output(output_mutex_);
  write_out(leftover);
}

}  // namespace hsm::agent
