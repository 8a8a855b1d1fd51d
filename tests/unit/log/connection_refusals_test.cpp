// Refused connections summarised per uid (log/connection_refusals.cpp): the first refusal of a
// uid is audited at once, later ones at most once a second with their count, the timer writes
// what is left, quiet uids are forgotten and the table stays bounded whatever the uids.
#include "log/connection_refusals.hpp"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "audit_test_support.hpp"
#include "log/audit_log.hpp"

using hsm::agent::AuditLog;
using hsm::agent::Caller;
using hsm::agent::ConnectionRefusals;
using hsm::agent::RefusalReason;
using namespace std::chrono_literals;

namespace {

// An audit log in a temporary file, and its lines as (uid, count, other_uids) once flushed.
class AuditFile {
 public:
  AuditFile()
      : audit_((dir_.path() / "audit.log").string(), hsm::agent::AuditOptions{}, seen_.metrics,
               seen_.health) {}

  AuditLog& audit() { return audit_; }

  struct Line {
    std::uint32_t uid;
    std::uint64_t count;
    bool other_uids;
  };
  std::vector<Line> lines() {
    audit_.flush();
    static const std::regex shape(
        R"(\{"time":"[^"]+","event":"connection_refused","result":"permission_denied",)"
        R"("count":(\d+),"peer":\{"pid":\d+,"uid":(\d+),"gid":\d+\}(,"other_uids":true)?\})");
    std::vector<Line> out;
    std::ifstream in(dir_.path() / "audit.log");
    for (std::string line; std::getline(in, line);) {
      std::smatch match;
      REQUIRE(std::regex_match(line, match, shape));
      out.push_back({static_cast<std::uint32_t>(std::stoul(match[2])), std::stoull(match[1]),
                     match[3].matched});
    }
    return out;
  }

 private:
  hsm::agent::test::TempDir dir_;
  hsm::agent::test::Observers seen_;
  AuditLog audit_;
};

Caller caller(std::uint32_t uid) {
  return Caller{static_cast<pid_t>(uid + 1), uid, uid};
}

}  // namespace

TEST_CASE("refusals: the first of a uid at once, then one line a second with the count",
          "[log][refusals]") {
  AuditFile file;
  ConnectionRefusals refusals(file.audit());
  const auto t0 = ConnectionRefusals::Clock::now();

  refusals.refused(caller(10002), RefusalReason::kPolicy, t0);
  auto lines = file.lines();
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].uid == 10002);
  CHECK(lines[0].count == 1);

  // A flood within the second: no line until the second has passed.
  for (int i = 0; i < 1000; ++i) refusals.refused(caller(10002), RefusalReason::kPolicy, t0 + 1ms);
  refusals.flush_due(t0 + 500ms);
  CHECK(file.lines().size() == 1);
  // The next refusal after a second writes the count since the last line, itself included.
  refusals.refused(caller(10002), RefusalReason::kPolicy, t0 + 1s);
  lines = file.lines();
  REQUIRE(lines.size() == 2);
  CHECK(lines[1].count == 1001);

  // A count left pending is written by the timer a second after the previous line.
  for (int i = 0; i < 7; ++i) refusals.refused(caller(10002), RefusalReason::kPolicy, t0 + 1500ms);
  refusals.flush_due(t0 + 1900ms);
  CHECK(file.lines().size() == 2);
  refusals.flush_due(t0 + 2s);
  lines = file.lines();
  REQUIRE(lines.size() == 3);
  CHECK(lines[2].count == 7);

  // Another uid is summarised on its own.
  refusals.refused(caller(10003), RefusalReason::kPolicy, t0 + 2s);
  lines = file.lines();
  REQUIRE(lines.size() == 4);
  CHECK(lines[3].uid == 10003);
  CHECK(lines[3].count == 1);
}

TEST_CASE("refusals: only policy refusals are audited, and flush_all writes what is pending",
          "[log][refusals]") {
  AuditFile file;
  ConnectionRefusals refusals(file.audit());
  const auto t0 = ConnectionRefusals::Clock::now();
  refusals.refused(caller(1), RefusalReason::kMaxConnections, t0);
  refusals.refused(caller(1), RefusalReason::kShuttingDown, t0);
  CHECK(file.lines().empty());  // logged (a warning), not audited
  refusals.refused(caller(1), RefusalReason::kPolicy, t0);
  refusals.refused(caller(1), RefusalReason::kPolicy, t0);
  refusals.refused(caller(2), RefusalReason::kPolicy, t0);
  refusals.refused(caller(2), RefusalReason::kPolicy, t0);
  refusals.flush_all();
  std::map<std::uint32_t, std::uint64_t> counted;
  for (const auto& line : file.lines()) counted[line.uid] += line.count;
  CHECK(counted == std::map<std::uint32_t, std::uint64_t>{{1, 2}, {2, 2}});
}

TEST_CASE("refusals: quiet uids are forgotten, and a hostile set of uids cannot grow the table",
          "[log][refusals]") {
  AuditFile file;
  ConnectionRefusals refusals(file.audit());
  const auto t0 = ConnectionRefusals::Clock::now();
  constexpr std::uint32_t kUids = 5000;
  for (std::uint32_t uid = 0; uid < kUids; ++uid) {
    refusals.refused(caller(100000 + uid), RefusalReason::kPolicy, t0);
  }
  CHECK(refusals.tracked_uids() == ConnectionRefusals::kMaxUids);
  // The others share one summary: its first refusal is written, then one line a second.
  auto lines = file.lines();
  CHECK(lines.size() == ConnectionRefusals::kMaxUids + 1);
  refusals.flush_due(t0 + 1s);
  lines = file.lines();
  std::uint64_t total = 0;
  std::uint64_t beyond = 0;
  for (const auto& line : lines) {
    total += line.count;
    if (line.other_uids) beyond += line.count;
  }
  CHECK(total == kUids);  // every refusal accounted for
  CHECK(beyond == kUids - ConnectionRefusals::kMaxUids);
  CHECK(lines.size() == ConnectionRefusals::kMaxUids + 2);

  // A second later with nothing pending, the table is empty again.
  refusals.flush_due(t0 + 2s);
  CHECK(refusals.tracked_uids() == 0);
  refusals.refused(caller(100000), RefusalReason::kPolicy, t0 + 2s);
  CHECK(file.lines().size() == ConnectionRefusals::kMaxUids + 3);  // a first refusal again
}
