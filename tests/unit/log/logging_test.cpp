// The ordinary logs (log/logging.cpp): stderr, one line per message, as text or as JSON objects
// with time, level and msg, filtered by level; an unknown level is a configuration error.
#include "log/logging.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "config/agent_config.hpp"

using hsm::agent::ConfigError;
using hsm::agent::init_logging;
using hsm::agent::LogFormat;

namespace {

// Runs `body` with file descriptor 2 pointed at a file and returns what was written to it.
std::vector<std::string> capture_stderr(const std::function<void()>& body) {
  std::string pattern = (std::filesystem::temp_directory_path() / "hsm-log-XXXXXX").string();
  const int fd = ::mkstemp(pattern.data());
  REQUIRE(fd >= 0);
  std::fflush(stderr);
  const int saved = ::dup(2);
  REQUIRE(saved >= 0);
  ::dup2(fd, 2);
  ::close(fd);
  body();
  hsm::agent::flush_logs();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);

  std::ifstream in(pattern);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  std::filesystem::remove(pattern);
  return lines;
}

const std::string kTime = R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z)";

}  // namespace

TEST_CASE("JSON logs: one object per line with time, level and an escaped msg", "[log]") {
  const auto lines = capture_stderr([] {
    init_logging("info", LogFormat::kJson);
    spdlog::info("connection {} closed: {}", 7, "bad \"bytes\"\n\x01 here");
    spdlog::debug("below the level: not written");
    spdlog::warn("careful");
    spdlog::error("broken \xFF byte");
  });
  REQUIRE(lines.size() == 3);
  CHECK(std::regex_match(lines[0], std::regex(R"(\{"time":")" + kTime +
                                              R"(","level":"info","msg":"connection 7 closed: )"
                                              R"(bad \\"bytes\\"\\n\\u0001 here"\})")));
  CHECK(std::regex_match(
      lines[1], std::regex(R"(\{"time":")" + kTime + R"(","level":"warning","msg":"careful"\})")));
  CHECK(std::regex_match(lines[2], std::regex(R"(\{"time":")" + kTime +
                                              R"(","level":"error","msg":"broken )"
                                              "\xEF\xBF\xBD"
                                              R"( byte"\})")));
}

TEST_CASE("text logs: time, level, message", "[log]") {
  const auto lines = capture_stderr([] {
    init_logging("debug", LogFormat::kText);
    spdlog::debug("token '{}' ready", "t1");
    spdlog::trace("below the level");
  });
  REQUIRE(lines.size() == 1);
  CHECK(std::regex_match(lines[0], std::regex(kTime + " debug token 't1' ready")));
}

TEST_CASE("the level filters, and an unknown level is refused", "[log]") {
  const auto lines = capture_stderr([] {
    init_logging("error", LogFormat::kJson);
    spdlog::warn("filtered");
    spdlog::error("kept");
  });
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find(R"("msg":"kept")") != std::string::npos);
  CHECK_THROWS_AS(init_logging("verbose", LogFormat::kText), ConfigError);
  // Leave the process with a plain logger for whatever runs next.
  init_logging("warn", LogFormat::kText);
}

TEST_CASE("a start-up failure: a critical JSON line with JSON logs, the plain line with text",
          "[log]") {
  const auto json = capture_stderr([] {
    init_logging("error", LogFormat::kJson);
    hsm::agent::log_startup_failure("cannot open token \"x\"");
  });
  REQUIRE(json.size() == 1);
  CHECK(std::regex_match(json[0], std::regex(R"(\{"time":")" + kTime +
                                             R"(","level":"critical","msg":"cannot open )"
                                             R"(token \\"x\\""\})")));
  const auto text = capture_stderr([] {
    init_logging("error", LogFormat::kText);
    hsm::agent::log_startup_failure("cannot open token 'x'");
  });
  REQUIRE(text.size() == 1);
  CHECK(text[0] == "hsm-agent: cannot open token 'x'");
  init_logging("warn", LogFormat::kText);
}
