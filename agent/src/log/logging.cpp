#include "log/logging.hpp"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <memory>

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

std::atomic<bool> json_format{false};

}  // namespace

void log_startup_failure(const std::string& message) {
  if (json_format.load()) {
    spdlog::critical("{}", message);
    spdlog::default_logger()->flush();
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
  auto logger = std::make_shared<spdlog::logger>("hsm-agent",
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
  auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  if (format == LogFormat::kJson) {
    formatter->add_flag<JsonMessageFlag>('j').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","msg":%j})");
  } else {
    formatter->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l %v");
  }
  logger->set_formatter(std::move(formatter));
  logger->set_level(parsed);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(std::move(logger));
  json_format.store(format == LogFormat::kJson);
}

}  // namespace hsm::agent
