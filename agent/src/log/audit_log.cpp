#include "log/audit_log.hpp"

#include <fcntl.h>
#include <spdlog/async.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <stdexcept>

#include "log/json_text.hpp"

namespace hsm::agent {
namespace {

// spdlog preallocates and touches every slot (about 400 bytes each) at start: 64K slots were
// 26 MiB of the agent's RSS. 8K slots (3 MiB) still hold a third of a second of signing at
// 25k/s; when the writer falls further behind, the loop blocks rather than lose audit lines.
constexpr std::size_t kQueueLines = 8 * 1024;

std::shared_ptr<spdlog::details::thread_pool> make_writer_thread() {
  return std::make_shared<spdlog::details::thread_pool>(kQueueLines, 1);
}

spdlog::sink_ptr open_sink(const std::string& path) {
  spdlog::sink_ptr sink;
  if (path == "-") {
    sink = std::make_shared<spdlog::sinks::stdout_sink_mt>();
  } else {
    // Create with 0600 before spdlog opens it: audit lines name callers and keys.
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) throw std::runtime_error("cannot open audit log " + path);
    ::close(fd);
    sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, false);
  }
  sink->set_pattern("%v");
  return sink;
}

/// An async logger on `pool`'s writer thread, or a synchronous one when `pool` is null.
std::shared_ptr<spdlog::logger> make_logger(
    spdlog::sink_ptr sink, const std::shared_ptr<spdlog::details::thread_pool>& pool) {
  std::shared_ptr<spdlog::logger> logger;
  if (pool) {
    logger = std::make_shared<spdlog::async_logger>("audit", std::move(sink), pool,
                                                    spdlog::async_overflow_policy::block);
  } else {
    logger = std::make_shared<spdlog::logger>("audit", std::move(sink));
  }
  logger->set_level(spdlog::level::info);
  logger->flush_on(spdlog::level::info);
  return logger;
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

AuditLog::AuditLog(std::string path)
    : path_(std::move(path)),
      pool_(make_writer_thread()),
      logger_(make_logger(open_sink(path_), pool_)) {}

AuditLog::~AuditLog() {
  close();
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
  write(format(record));
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
  write(line);
}

void AuditLog::write(const std::string& line) {
  std::shared_lock lock(mutex_);
  logger_->info(line);
}

void AuditLog::drain_locked() {
  // Queued lines hold their own reference to the logger. Destroying the thread pool queues a
  // terminate message behind every line and joins the writer thread, so when reset() returns
  // every line has reached the sink (flush_on(info) flushed each one).
  logger_.reset();
  pool_.reset();
}

void AuditLog::reopen() {
  if (path_ == "-") return;
  spdlog::sink_ptr fresh;
  try {
    fresh = open_sink(path_);
  } catch (const std::exception& e) {
    spdlog::error("cannot reopen audit log, keeping the old file: {}", e.what());
    return;
  }
  {
    std::unique_lock lock(mutex_);
    // Lines queued before the swap go to the old file first: the order of the log holds.
    const bool async = pool_ != nullptr;
    drain_locked();
    if (async) pool_ = make_writer_thread();
    logger_ = make_logger(std::move(fresh), pool_);
  }
  spdlog::info("audit log reopened: {}", path_);
}

void AuditLog::flush() {
  std::unique_lock lock(mutex_);
  if (!pool_) {
    logger_->flush();
    return;
  }
  auto sink = logger_->sinks().front();
  drain_locked();
  pool_ = make_writer_thread();
  logger_ = make_logger(std::move(sink), pool_);
}

void AuditLog::close() {
  std::unique_lock lock(mutex_);
  if (!pool_) return;
  auto sink = logger_->sinks().front();
  drain_locked();
  logger_ = make_logger(std::move(sink), nullptr);
}

}  // namespace hsm::agent
