// Does the agent's own JSON string escaping (log/json_text.cpp) earn its place next to
// nlohmann-json? Formats the audit line of one ES256 sign both ways, on this thread, and prints
// ns per line (docs/performance.md, "JSON escaping in the audit log"). No token, no I/O.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "log/audit_log.hpp"
#include "log/json_text.hpp"

namespace {

using Clock = std::chrono::steady_clock;

hsm::agent::AuditRecord sign_record() {
  hsm::agent::AuditRecord record;
  record.method = hsm::protocol::Method::kSign;
  record.kid = "payments-signing-key-2026";
  record.alg = "ES256";
  record.duration_seconds = 0.000412;
  record.caller.pid = 4242;
  record.caller.uid = 1000;
  record.caller.gid = 1000;
  return record;
}

// The same line built as a JSON value and serialised by nlohmann-json (what the fast path
// would be replaced by); the time is formatted the same way for both.
std::string nlohmann_line(const hsm::agent::AuditRecord& record) {
  nlohmann::ordered_json line;
  line["time"] = "2026-12-07T19:00:00.000Z";
  line["event"] = "request";
  line["method"] = hsm::protocol::to_string(record.method);
  line["kid"] = record.kid;
  line["alg"] = record.alg;
  line["result"] = "ok";
  line["duration_ms"] = record.duration_seconds * 1000.0;
  line["peer"] = {
      {"pid", record.caller.pid}, {"uid", record.caller.uid}, {"gid", record.caller.gid}};
  return line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

template <class Format>
double ns_per_line(Format format, int lines) {
  std::size_t bytes = 0;  // keeps the work observable
  const auto start = Clock::now();
  for (int i = 0; i < lines; ++i) bytes += format().size();
  const auto elapsed = std::chrono::duration<double, std::nano>(Clock::now() - start).count();
  if (bytes == 0) std::puts("");
  return elapsed / lines;
}

}  // namespace

int main() {
  constexpr int kLines = 1'000'000;
  const hsm::agent::AuditRecord record = sign_record();
  for (int round = 0; round < 3; ++round) {
    const double own = ns_per_line([&] { return hsm::agent::AuditLog::format(record); }, kLines);
    const double library = ns_per_line([&] { return nlohmann_line(record); }, kLines);
    std::printf("audit line: append_json_string %.0f ns, nlohmann-json %.0f ns (x%.1f)\n", own,
                library, library / own);
  }
  return 0;
}
