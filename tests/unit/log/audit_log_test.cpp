// The audit log: the exact line AuditLog::format builds (field order, names, number formats,
// escaping, optional fields), which requests are audited, and the file itself (created 0600,
// whole lines under concurrent writers, reopened after rotation without losing a line, the old
// file kept when the new one cannot be opened); and what happens when the output fails or is
// slow: record() never waits, lines that do not fit are dropped and counted, the log fails
// closed until a write succeeds, and a write cut short never leaves half a line.
#include "log/audit_log.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "audit_test_support.hpp"

using hsm::agent::AuditLog;
using hsm::agent::AuditOptions;
using hsm::agent::AuditRecord;
using hsm::agent::Caller;
using hsm::agent::test::Observers;
using hsm::agent::test::TempDir;
using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view kTimePrefix = R"({"time":")";
constexpr std::size_t kTimeLength = 27;  // 2024-06-11T10:20:30.123456Z

const std::regex kTimeShape(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z)");

// The time field and everything after it.
std::pair<std::string, std::string> split_time(const std::string& line) {
  REQUIRE(line.size() > kTimePrefix.size() + kTimeLength);
  REQUIRE(line.substr(0, kTimePrefix.size()) == kTimePrefix);
  return {line.substr(kTimePrefix.size(), kTimeLength),
          line.substr(kTimePrefix.size() + kTimeLength)};
}

std::array<std::uint8_t, 32> counting_bytes() {
  std::array<std::uint8_t, 32> bytes{};
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes.at(i) = static_cast<std::uint8_t>(i * 8 + 7);
  return bytes;
}

std::vector<std::string> read_lines(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

// Lines are written by spdlog's writer thread, so they land some time after record() returns
// (and flush() only queues a flush): wait for them, for at most 10 s.
std::vector<std::string> wait_for_lines(const std::filesystem::path& path, std::size_t count) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  auto lines = read_lines(path);
  while (lines.size() < count && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(5ms);
    lines = read_lines(path);
  }
  return lines;
}

// Polls `condition` for at most 10 s (state changes on the writer's thread).
template <class Predicate>
bool wait_until_state(Predicate condition) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

AuditRecord sign_record(std::string kid) {
  AuditRecord record;
  record.method = Method::kSign;
  record.kid = std::move(kid);
  record.alg = "ES256";
  record.duration_seconds = 0.0015;
  record.caller = Caller{42, 1000, 100};
  record.input_sha256 = counting_bytes();
  return record;
}

}  // namespace

TEST_CASE("an audit line carries every field in a fixed order", "[log][audit]") {
  // system_clock, as the code under test uses (time() may read a coarser clock).
  const auto before = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  const std::string line = AuditLog::format(sign_record("k1"));
  const auto after = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());

  const auto [time, rest] = split_time(line);
  CHECK(rest ==
        R"(","event":"request","method":"sign","kid":"k1","alg":"ES256","result":"ok",)"
        R"("duration_ms":1.500,"peer":{"pid":42,"uid":1000,"gid":100},)"
        R"("input_sha256":"070f171f272f373f474f575f676f777f878f979fa7afb7bfc7cfd7dfe7eff7ff"})");
  CHECK(line.find('\n') == std::string::npos);

  // RFC 3339 in UTC with microseconds, and really now (UTC, not local time).
  CHECK(std::regex_match(time, kTimeShape));
  std::tm parsed{};
  REQUIRE(::strptime(time.c_str(), "%Y-%m-%dT%H:%M:%S", &parsed) != nullptr);
  const std::time_t seconds = ::timegm(&parsed);
  CHECK(seconds >= before);
  CHECK(seconds <= after);
}

TEST_CASE("optional fields are left out, not written empty", "[log][audit]") {
  AuditRecord record;  // every default: capabilities, no kid, no alg, ok, no caller, no hash
  const auto [time, rest] = split_time(AuditLog::format(record));
  CHECK(rest == R"(","event":"request","method":"capabilities","kid":"","result":"ok",)"
                R"("duration_ms":0.000,"peer":{"pid":0,"uid":4294967295,"gid":4294967295}})");
  CHECK(rest.find("alg") == std::string::npos);
  CHECK(rest.find("input_sha256") == std::string::npos);
}

TEST_CASE("result is the error code's wire name, method the method's", "[log][audit]") {
  for (const auto code : hsm::protocol::all_error_codes()) {
    AuditRecord record;
    record.method = Method::kGenerateKey;
    record.kid = "k";
    record.code = code;
    const std::string expected =
        R"("result":")" + std::string(hsm::protocol::to_string(code)) + R"(",)";
    CHECK(AuditLog::format(record).find(expected) != std::string::npos);
  }
  for (const auto method : hsm::protocol::all_methods()) {
    AuditRecord record;
    record.method = method;
    const std::string expected =
        R"("method":")" + std::string(hsm::protocol::to_string(method)) + R"(",)";
    CHECK(AuditLog::format(record).find(expected) != std::string::npos);
  }
}

TEST_CASE("the caller's kid cannot break the line or forge a field", "[log][audit]") {
  AuditRecord record = sign_record("a\"b\\c\nd\x01\xFF\",\"result\":\"ok");
  record.code = ErrorCode::kNotFound;
  const std::string line = AuditLog::format(record);
  CHECK(line.find('\n') == std::string::npos);
  CHECK(line.find(R"("kid":"a\"b\\c\nd\u0001)"
                  "\xEF\xBF\xBD"
                  R"(\",\"result\":\"ok","alg":)") != std::string::npos);
  // Exactly one result field, the real one.
  CHECK(line.find(R"(,"result":"not_found",)") != std::string::npos);
  std::size_t results = 0;
  for (auto at = line.find(R"("result":)"); at != std::string::npos;
       at = line.find(R"("result":)", at + 1)) {
    ++results;
  }
  CHECK(results == 1);
}

TEST_CASE("numbers: milliseconds with 3 decimals, ids unsigned", "[log][audit]") {
  AuditRecord record;
  record.caller = Caller{2147483647, 4294967294U, 65534};
  const std::vector<std::pair<double, std::string>> durations = {
      {0.0, "0.000"},    {0.0000001, "0.000"}, {0.0005, "0.500"},
      {0.25, "250.000"}, {2.0, "2000.000"},    {12.5, "12500.000"}};
  for (const auto& [seconds, text] : durations) {
    record.duration_seconds = seconds;
    const std::string line = AuditLog::format(record);
    CHECK(line.find(R"("duration_ms":)" + text + ",") != std::string::npos);
    CHECK(line.find(R"("peer":{"pid":2147483647,"uid":4294967294,"gid":65534})") !=
          std::string::npos);
  }
}

TEST_CASE("which requests are audited, and which are key operations", "[log][audit]") {
  const std::vector<Method> key_operations = {Method::kGenerateKey, Method::kSign, Method::kVerify,
                                              Method::kDeleteKey, Method::kSignBatch};
  for (const auto method : hsm::protocol::all_methods()) {
    const bool key_operation =
        std::find(key_operations.begin(), key_operations.end(), method) != key_operations.end();
    INFO("method " << hsm::protocol::to_string(method));
    // Successes: the key operations only (not capabilities, health, list_keys, ...).
    CHECK(AuditLog::audited(method, std::nullopt) == key_operation);
    CHECK(AuditLog::key_operation(method) == key_operation);
    // Every denied or failed request, whatever its method.
    for (const auto code : hsm::protocol::all_error_codes()) {
      INFO("code " << hsm::protocol::to_string(code));
      CHECK(AuditLog::audited(method, code));
    }
  }
}

TEST_CASE("the audit file is created 0600 and gets one line per record", "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  {
    Observers seen;
    AuditLog audit(path.string(), {}, seen.metrics, seen.health);
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    audit.record(sign_record("first"));
    audit.record_refused_connections(Caller{7, 1234, 5678}, 1, false);
    audit.record_refused_connections(Caller{8, 1235, 5679}, 4096, true);
    audit.flush();
    const auto lines = wait_for_lines(path, 3);
    REQUIRE(lines.size() == 3);
    CHECK(lines[0].find(R"("kid":"first")") != std::string::npos);
    const auto [time, rest] = split_time(lines[1]);
    CHECK(std::regex_match(time, kTimeShape));
    CHECK(rest == R"(","event":"connection_refused","result":"permission_denied","count":1,)"
                  R"("peer":{"pid":7,"uid":1234,"gid":5678}})");
    CHECK(split_time(lines[2]).second ==
          R"(","event":"connection_refused","result":"permission_denied","count":4096,)"
          R"("peer":{"pid":8,"uid":1235,"gid":5679},"other_uids":true})");
  }
  // Appends to an existing file rather than truncating it.
  Observers seen;
  AuditLog again(path.string(), {}, seen.metrics, seen.health);
  again.record(sign_record("fourth"));
  const auto lines = wait_for_lines(path, 4);
  REQUIRE(lines.size() == 4);
  CHECK(lines[3].find(R"("kid":"fourth")") != std::string::npos);
}

TEST_CASE("an audit file that cannot be opened is an error naming it", "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "missing-directory" / "audit.log";
  Observers seen;
  try {
    AuditLog audit(path.string(), {}, seen.metrics, seen.health);
    FAIL("opened an audit log in a directory that does not exist");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find(path.string()) != std::string::npos);
  }
}

TEST_CASE("concurrent records stay whole lines", "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  Observers seen;
  AuditLog audit(path.string(), {}, seen.metrics, seen.health);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 500;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&audit, t] {
      for (int i = 0; i < kPerThread; ++i) {
        audit.record(sign_record("t" + std::to_string(t) + "-" + std::to_string(i)));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  const auto lines = wait_for_lines(path, kThreads * kPerThread);
  REQUIRE(lines.size() == static_cast<std::size_t>(kThreads * kPerThread));
  const std::regex shape(
      R"(\{"time":"[^"]{27}","event":"request","method":"sign","kid":"t\d-\d+",)"
      R"("alg":"ES256","result":"ok","duration_ms":1\.500,)"
      R"("peer":\{"pid":42,"uid":1000,"gid":100\},"input_sha256":"[0-9a-f]{64}"\})");
  for (const auto& line : lines) REQUIRE(std::regex_match(line, shape));
}

TEST_CASE("reopen after rotation: old lines stay, new lines go to the new file", "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  const auto rotated = dir.path() / "audit.log.1";
  Observers seen;
  AuditLog audit(path.string(), {}, seen.metrics, seen.health);
  audit.record(sign_record("before-1"));
  audit.record(sign_record("before-2"));
  std::filesystem::rename(path, rotated);
  // Written after the rename but before the reopen: still to the open (renamed) file.
  audit.record(sign_record("between"));
  audit.reopen();
  audit.record(sign_record("after"));

  const auto old_lines = wait_for_lines(rotated, 3);
  const auto new_lines = wait_for_lines(path, 1);
  REQUIRE(old_lines.size() == 3);
  CHECK(old_lines[0].find(R"("kid":"before-1")") != std::string::npos);
  CHECK(old_lines[1].find(R"("kid":"before-2")") != std::string::npos);
  CHECK(old_lines[2].find(R"("kid":"between")") != std::string::npos);
  REQUIRE(new_lines.size() == 1);
  CHECK(new_lines[0].find(R"("kid":"after")") != std::string::npos);
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
}

TEST_CASE("reopen that fails keeps writing to the old file", "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  const auto rotated = dir.path() / "audit.log.1";
  Observers seen;
  AuditLog audit(path.string(), {}, seen.metrics, seen.health);
  audit.record(sign_record("before"));
  std::filesystem::rename(path, rotated);
  std::filesystem::create_directory(path);  // the path cannot be opened as a file now
  audit.reopen();                           // logged, not thrown
  audit.record(sign_record("after-failed-reopen"));
  const auto lines = wait_for_lines(rotated, 2);
  REQUIRE(lines.size() == 2);
  CHECK(lines[1].find(R"("kid":"after-failed-reopen")") != std::string::npos);
  CHECK(std::filesystem::is_directory(path));
}

TEST_CASE("reopen on stdout does nothing", "[log][audit]") {
  Observers seen;
  AuditLog audit("-", {}, seen.metrics, seen.health);
  CHECK_NOTHROW(audit.reopen());
}

TEST_CASE("sign_batch: an items array with each item's kid, result and input SHA-256",
          "[log][audit]") {
  AuditRecord record;
  record.method = Method::kSignBatch;
  record.caller = Caller{1, 2, 3};
  record.items.push_back({"a", std::nullopt, counting_bytes()});
  record.items.push_back({"b\"", ErrorCode::kNotFound, std::nullopt});
  const auto [time, rest] = split_time(AuditLog::format(record));
  CHECK(rest == R"(","event":"request","method":"sign_batch","kid":"","result":"ok",)"
                R"("duration_ms":0.000,"peer":{"pid":1,"uid":2,"gid":3},"items":[)"
                R"({"kid":"a","result":"ok","input_sha256":")" +
                    std::string("070f171f272f373f474f575f676f777f878f979fa7afb7bfc7cfd7dfe7eff7ff") +
                    R"("},{"kid":"b\"","result":"not_found"}]})");
  // Other methods never carry items.
  CHECK(AuditLog::format(sign_record("k")).find("items") == std::string::npos);
}

TEST_CASE("flush() and close() return only once every recorded line is in the file",
          "[log][audit]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  Observers seen;
  AuditLog audit(path.string(), {}, seen.metrics, seen.health);
  constexpr std::size_t kLines = 5000;
  for (std::size_t i = 0; i < kLines; ++i) audit.record(sign_record("k" + std::to_string(i)));
  audit.flush();
  CHECK(read_lines(path).size() == kLines);  // no waiting: flush() waited
  for (std::size_t i = 0; i < kLines; ++i) audit.record(sign_record("m" + std::to_string(i)));
  audit.close();
  CHECK(read_lines(path).size() == 2 * kLines);
  // After close(), lines are written synchronously: none is lost either.
  audit.record(sign_record("after-close"));
  const auto lines = read_lines(path);
  REQUIRE(lines.size() == 2 * kLines + 1);
  CHECK(lines.back().find(R"("kid":"after-close")") != std::string::npos);
  audit.close();  // idempotent
  audit.reopen();  // and rotation still works, synchronously
  audit.record(sign_record("after-reopen"));
  CHECK(read_lines(path).size() == 2 * kLines + 2);
}

// ---- an output that is slow or fails ---------------------------------------------------------

TEST_CASE(
    "a writer that cannot keep up: record() never waits, the overflow is dropped and "
    "counted, and the log fails closed until a write succeeds",
    "[log][audit][failing]") {
  std::signal(SIGPIPE, SIG_IGN);  // as the agent does: a reader gone is an error, not a kill
  TempDir dir;
  const auto fifo = dir.path() / "audit.fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // A reader that reads nothing for now: the writer blocks once the pipe's buffer is full.
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  REQUIRE(reader >= 0);
  Observers seen;
  AuditLog audit(fifo.string(), AuditOptions{.max_pending_bytes = 64 * 1024}, seen.metrics,
                 seen.health);
  CHECK_FALSE(audit.refuses_key_operations());

  // Far more than the pipe (64 KiB) and the queue (64 KiB) hold: this returns, it never waits.
  constexpr int kLines = 2000;
  for (int i = 0; i < kLines; ++i) audit.record(sign_record("k" + std::to_string(i)));
  CHECK(seen.dropped() > 0);
  CHECK(audit.refuses_key_operations());
  CHECK(seen.failing() == 1);
  REQUIRE(seen.health.not_ready_reason().has_value());
  CHECK(seen.health.not_ready_reason()->find("cannot keep up") != std::string::npos);

  // The reader catches up: the writer's next write clears the state.
  std::string text;
  char buffer[65536];
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (audit.refuses_key_operations() && std::chrono::steady_clock::now() < until) {
    const ssize_t n = ::read(reader, buffer, sizeof(buffer));
    if (n > 0) text.append(buffer, static_cast<std::size_t>(n));
    std::this_thread::sleep_for(1ms);
  }
  CHECK_FALSE(audit.refuses_key_operations());
  CHECK(seen.failing() == 0);
  CHECK_FALSE(seen.health.not_ready_reason().has_value());
  // What was not dropped arrives whole, in order.
  audit.record(sign_record("last"));
  while (text.find(R"("kid":"last")") == std::string::npos &&
         std::chrono::steady_clock::now() < until) {
    const ssize_t n = ::read(reader, buffer, sizeof(buffer));
    if (n > 0) text.append(buffer, static_cast<std::size_t>(n));
    std::this_thread::sleep_for(1ms);
  }
  ::close(reader);
  REQUIRE(text.back() == '\n');
  std::istringstream lines(text);
  std::size_t count = 0;
  std::string line;
  int previous = -1;
  while (std::getline(lines, line)) {
    ++count;
    REQUIRE(line.back() == '}');
    const auto at = line.find(R"("kid":"k)");
    if (at == std::string::npos) {
      CHECK(line.find(R"("kid":"last")") != std::string::npos);
      continue;
    }
    const int index = std::stoi(line.substr(at + 8));
    CHECK(index > previous);
    previous = index;
  }
  CHECK(count + static_cast<std::size_t>(seen.dropped()) == kLines + 1);
}

TEST_CASE(
    "a write cut short leaves no half line: the file is cut back, the lines are kept and "
    "written once there is room; meanwhile key operations are refused",
    "[log][audit][failing]") {
  TempDir dir;
  const auto path = dir.path() / "audit.log";
  Observers seen;
  AuditLog audit(path.string(), AuditOptions{.retry_interval = 20ms}, seen.metrics, seen.health);
  // A file size limit stands in for a full disk: write(2) writes up to it, then fails (EFBIG).
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  // Three lines and half of the fourth.
  const std::size_t line_size = AuditLog::format(sign_record("k0")).size() + 1;
  const std::size_t limit = 3 * line_size + line_size / 2;
  rlimit small = saved;
  small.rlim_cur = limit;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);

  constexpr std::size_t kLines = 10;
  for (std::size_t i = 0; i < kLines; ++i) audit.record(sign_record("k" + std::to_string(i)));
  audit.flush();  // returns: the log is failing
  CHECK(audit.refuses_key_operations());
  CHECK(seen.write_errors() >= 1);
  CHECK(seen.failing() == 1);
  REQUIRE(seen.health.not_ready_reason().has_value());
  CHECK(seen.health.not_ready_reason()->find("audit log cannot be written") != std::string::npos);
  // Whole lines only, though the limit fell inside the fourth.
  CHECK(std::filesystem::file_size(path) == 3 * line_size);
  const auto before = read_lines(path);
  CHECK(before.size() == 3);
  for (const auto& line : before) CHECK(line.back() == '}');

  REQUIRE(::setrlimit(RLIMIT_FSIZE, &saved) == 0);
  std::signal(SIGXFSZ, SIG_DFL);
  const auto lines = wait_for_lines(path, kLines);
  REQUIRE(lines.size() == kLines);
  for (std::size_t i = 0; i < kLines; ++i) {
    CHECK(lines.at(i).find(R"("kid":"k)" + std::to_string(i) + "\"") != std::string::npos);
    CHECK(lines.at(i).back() == '}');
  }
  CHECK(wait_until_state([&] { return !audit.refuses_key_operations(); }));
  CHECK(seen.failing() == 0);
  CHECK(seen.dropped() == 0);
}

TEST_CASE("failing open (--audit-fail-open): counted and shown, key operations go on",
          "[log][audit][failing]") {
  Observers seen;
  AuditLog audit("/dev/full", AuditOptions{.fail_open = true, .retry_interval = 10ms}, seen.metrics,
                 seen.health);
  audit.record(sign_record("lost"));
  audit.flush();
  CHECK(seen.failing() == 1);
  CHECK(seen.write_errors() >= 1);
  CHECK_FALSE(audit.refuses_key_operations());
  CHECK_FALSE(seen.health.not_ready_reason().has_value());  // ready: it answers
  REQUIRE(seen.health.readiness_note().has_value());
  CHECK(seen.health.readiness_note()->find("audit log cannot be written") != std::string::npos);
}

TEST_CASE("close() on a log that cannot be written gives up at once and counts the lost lines",
          "[log][audit][failing]") {
  Observers seen;
  AuditLog audit("/dev/full", AuditOptions{.retry_interval = 60s}, seen.metrics, seen.health);
  for (int i = 0; i < 5; ++i) audit.record(sign_record("k" + std::to_string(i)));
  audit.flush();
  CHECK(audit.refuses_key_operations());
  const auto started = std::chrono::steady_clock::now();
  audit.close();  // no waiting for the 60 s retry
  CHECK(std::chrono::steady_clock::now() - started < 10s);
  CHECK(seen.dropped() == 5);
  audit.record(sign_record("after-close"));  // written synchronously: fails, counted
  CHECK(seen.dropped() == 6);
}
