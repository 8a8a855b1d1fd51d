#include "log/logging.hpp"

#include <spdlog/async.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "log/json_text.hpp"

namespace hsm::agent {
namespace {

// %j: the message as a JSON string literal (spdlog's %v is not escaped).
class JsonMessageFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    std::string escaped;
    append_json_string(escaped, std::string_view(msg.payload.data(), msg.payload.size()));
    dest.append(escaped.data(), escaped.data() + escaped.size());
  }
  [[nodiscard]] std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

// Lines waiting for the logger's thread. Beyond it the oldest are dropped (and counted), so a
// stderr that blocks or a burst of warnings never holds up the thread that logs. 2048 lines is
// 0.8 MiB of preallocated slots; the thread writes a line in microseconds to a file or a pipe
// that is read.
constexpr std::size_t kQueuedLines = 2048;

// stderr, counting the flushes the logger's thread performs so that flush_logs() can wait for
// its own. The thread writes the queue in order, and flush_logs() is the only source of flushes
// (every line is flushed by the sink as it is written, so the logger has no flush_on level):
// when the count reaches a caller's ticket, at least one flush queued after the caller took it
// was done, so every line the caller logged before is written.
class StderrSink final : public spdlog::sinks::stderr_sink_mt {
 public:
  void flush() override {
    spdlog::sinks::stderr_sink_mt::flush();
    {
      std::lock_guard lock(mutex_);
      ++flushed_count_;
    }
    flushed_.notify_all();
  }
  [[nodiscard]] std::uint64_t take_ticket() { return tickets_.fetch_add(1) + 1; }
  void wait_for(std::uint64_t ticket, std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex_);
    flushed_.wait_for(lock, limit, [&] { return flushed_count_ >= ticket; });
  }

 private:
  std::atomic<std::uint64_t> tickets_{0};
  std::mutex mutex_;
  std::condition_variable flushed_;
  std::uint64_t flushed_count_ = 0;
};

std::atomic<bool> json_format{false};
std::shared_ptr<StderrSink> stderr_output;  // set by init_logging, before any thread logs

}  // namespace

void flush_logs() {
  const auto logger = spdlog::default_logger();
  if (!stderr_output) {
    logger->flush();
    return;
  }
  const auto ticket = stderr_output->take_ticket();
  logger->flush();
  // Bounded: a stderr nobody reads must not hold up an exit for ever.
  stderr_output->wait_for(ticket, std::chrono::seconds(2));
}

std::uint64_t dropped_log_lines() {
  const auto pool = spdlog::thread_pool();
  return pool ? pool->overrun_counter() : 0;
}

void log_startup_failure(const std::string& message) {
  if (json_format.load()) {
    spdlog::critical("{}", message);
    flush_logs();
    return;
  }
  spdlog::logger plain("hsm-agent-startup", std::make_shared<spdlog::sinks::stderr_sink_mt>());
  plain.set_pattern("hsm-agent: %v");
  plain.critical("{}", message);
  plain.flush();
}

void init_logging(const std::string& level, LogFormat format) {
  const auto parsed = spdlog::level::from_str(level);
  if (parsed == spdlog::level::off && level != "off") {
    throw ConfigError("unknown log level '" + level + "'");
  }
  // Asynchronous: the caller only queues the message and never waits for stderr (the event
  // loop logs).
  spdlog::init_thread_pool(kQueuedLines, 1);
  stderr_output = std::make_shared<StderrSink>();
  auto logger =
      std::make_shared<spdlog::async_logger>("hsm-agent", stderr_output, spdlog::thread_pool(),
                                             spdlog::async_overflow_policy::overrun_oldest);
  auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  if (format == LogFormat::kJson) {
    formatter->add_flag<JsonMessageFlag>('j').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","msg":%j})");
  } else {
    formatter->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l %v");
  }
  logger->set_formatter(std::move(formatter));
  logger->set_level(parsed);
  spdlog::set_default_logger(std::move(logger));
  json_format.store(format == LogFormat::kJson);
}

}  // namespace hsm::agent
