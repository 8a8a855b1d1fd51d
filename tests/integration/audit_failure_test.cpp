// The audit log on a disk that fills up (issue 15 item 4, docs/security.md "The audit log"):
// the agent writes its audit log to a small tmpfs of its own, the test fills the tmpfs, then
// frees it. By default the agent fails closed: key operations are refused with
// audit_unavailable while a line cannot be written, /readyz says why, and signing comes back
// once the disk has room. With --audit-fail-open it keeps answering and counts. Either way no
// line is torn: every line of the file parses as JSON.
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;
using hsm::protocol::Method;
using namespace std::chrono_literals;
namespace protocol = hsm::protocol;

namespace {

/// A 64 KiB tmpfs on a fresh temporary directory, in a mount namespace private to this test
/// process and the agents it starts (so the mount goes away with the process whatever happens).
/// Needs root (CAP_SYS_ADMIN). Unmounted and removed on destruction.
class SmallDisk {
 public:
  SmallDisk() : path_(make_temp_dir("hsm-audit-disk")) {
    if (::unshare(CLONE_NEWNS) != 0 ||
        ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("tmpfs", path_.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0700") != 0) {
      FAIL("cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): " << std::strerror(errno));
    }
  }
  ~SmallDisk() {
    ::umount2(path_.c_str(), MNT_DETACH);
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  SmallDisk(const SmallDisk&) = delete;
  SmallDisk& operator=(const SmallDisk&) = delete;

  [[nodiscard]] std::filesystem::path audit_log() const { return path_ / "audit.log"; }

  /// Takes every free byte with a filler file.
  void fill() const {
    const int fd = ::open(filler().c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    const std::vector<char> block(4096, 'x');
    for (std::size_t size = block.size(); size > 0; size /= 2) {
      while (::write(fd, block.data(), size) == static_cast<ssize_t>(size)) {
      }
    }
    ::close(fd);
  }
  void free_space() const { std::filesystem::remove(filler()); }

 private:
  [[nodiscard]] std::filesystem::path filler() const { return path_ / "filler"; }
  std::filesystem::path path_;
};

std::uint32_t next_msgid() {
  static std::uint32_t id = 1;
  return id++;
}

protocol::SignParams sign_params(const std::string& kid, const std::string& data) {
  protocol::SignParams params;
  params.kid = kid;
  params.input = hsm::protocol::Data{protocol::Bytes(data.begin(), data.end())};
  return params;
}

/// "ok", or the wire name of the error the agent answered.
std::string outcome(RawConnection& connection, Method method, protocol::Params params) {
  const auto response =
      connection.call(protocol::Request{next_msgid(), method, std::move(params), std::nullopt});
  REQUIRE(response.has_value());
  if (const auto* error = std::get_if<protocol::Error>(&response->body)) {
    return std::string(protocol::to_string(error->code));
  }
  return "ok";
}

std::string sign(RawConnection& connection, const std::string& data) {
  return outcome(connection, Method::kSign, sign_params("audited", data));
}

double metric(const AgentProcess& agent, const std::string& series) {
  const auto [status, text] = agent.http_get("/metrics");
  REQUIRE(status == 200);
  return metric_sample(text, series);
}

/// Every line of the audit file, parsed: a line that is not JSON fails the test.
std::vector<nlohmann::json> audit_lines(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) {
    INFO("audit line " << lines.size() + 1 << ": " << line);
    REQUIRE(nlohmann::json::accept(line));
    lines.push_back(nlohmann::json::parse(line));
  }
  return lines;
}

std::size_t signatures_audited(const std::filesystem::path& path) {
  std::size_t n = 0;
  for (const auto& line : audit_lines(path)) {
    if (line.value("method", "") == "sign" && line.value("result", "") == "ok") ++n;
  }
  return n;
}

}  // namespace

TEST_CASE("audit: on a full disk key operations fail closed with audit_unavailable, then recover",
          "[reliability][audit]") {
  SmallDisk disk;
  RunningAgent env(AgentOptions{.extra_args = {"--audit-log", disk.audit_log().string()}});
  env.client.generate_key("audited");
  auto connection = env.connect();
  std::size_t signed_ok = 0;
  for (int i = 0; i < 3; ++i) signed_ok += sign(connection, "before " + std::to_string(i)) == "ok";
  REQUIRE(signed_ok == 3);
  REQUIRE(wait_until([&] { return signatures_audited(disk.audit_log()) == 3; }));

  disk.fill();
  // The signatures whose lines the agent could not write any more are answered until the
  // writer has failed once; from then on every key operation is refused.
  std::string last;
  for (int i = 0; i < 500 && last != "audit_unavailable"; ++i) {
    last = sign(connection, "full " + std::to_string(i));
    if (last == "ok") {
      ++signed_ok;
      std::this_thread::sleep_for(10ms);
    }
  }
  INFO("signatures answered ok: " << signed_ok);
  REQUIRE(last == "audit_unavailable");
  CHECK(sign(connection, "refused") == "audit_unavailable");
  CHECK(outcome(connection, Method::kSignBatch,
                protocol::SignBatchParams{{sign_params("audited", "in a batch")}}) ==
        "audit_unavailable");
  protocol::VerifyParams verify;
  verify.kid = "audited";
  verify.input = hsm::protocol::Data{protocol::Bytes{1, 2, 3}};
  verify.signature = protocol::Bytes(64, 0);
  CHECK(outcome(connection, Method::kVerify, verify) == "audit_unavailable");
  CHECK(outcome(connection, Method::kGenerateKey,
                protocol::GenerateKeyParams{"another", "ES256", std::nullopt}) ==
        "audit_unavailable");
  CHECK(outcome(connection, Method::kDeleteKey, protocol::KidParams{"audited"}) ==
        "audit_unavailable");
  // What is not a key operation is still answered.
  CHECK(outcome(connection, Method::kGetPublicKey, protocol::KidParams{"audited"}) == "ok");
  CHECK(outcome(connection, Method::kCapabilities, protocol::EmptyParams{}) == "ok");

  const auto [ready_status, ready_body] = env.agent.http_get("/readyz");
  CHECK(ready_status == 503);
  CHECK(ready_body.find("audit log") != std::string::npos);
  CHECK(metric(env.agent, "hsm_agent_audit_write_errors_total") >= 1);
  CHECK(metric(env.agent, "hsm_agent_audit_failing") == 1);
  CHECK(env.agent.stderr_text().find("cannot write the audit log") != std::string::npos);

  // Room again: the writer's next attempt succeeds, and signing works again.
  disk.free_space();
  CHECK(wait_until(
      [&] {
        const auto result = sign(connection, "after");
        signed_ok += result == "ok";
        return result == "ok";
      },
      10s));
  CHECK(env.agent.http_get("/readyz").first == 200);
  CHECK(metric(env.agent, "hsm_agent_audit_failing") == 0);
  // Every line whole, and every signature answered ok has its line: those held while the disk
  // was full were written once it had room.
  CHECK(wait_until([&] { return signatures_audited(disk.audit_log()) == signed_ok; }));
  CHECK(metric(env.agent, "hsm_agent_audit_dropped_lines_total") == 0);
  bool refusal_audited = false;
  for (const auto& line : audit_lines(disk.audit_log())) {
    refusal_audited |= line.value("result", "") == "audit_unavailable";
  }
  CHECK(refusal_audited);
  CHECK(env.agent.stop().code == 0);
}

TEST_CASE("audit: --audit-fail-open keeps signing on a full disk and counts, lines stay whole",
          "[reliability][audit]") {
  SmallDisk disk;
  RunningAgent env(
      AgentOptions{.extra_args = {"--audit-log", disk.audit_log().string(), "--audit-fail-open"}});
  env.client.generate_key("audited");
  auto connection = env.connect();
  REQUIRE(sign(connection, "before") == "ok");
  REQUIRE(wait_until([&] { return signatures_audited(disk.audit_log()) == 1; }));

  disk.fill();
  constexpr std::size_t kWhileFull = 20;
  for (std::size_t i = 0; i < kWhileFull; ++i) {
    CHECK(sign(connection, "full " + std::to_string(i)) == "ok");
    std::this_thread::sleep_for(10ms);
  }
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_audit_failing") == 1; }));
  CHECK(metric(env.agent, "hsm_agent_audit_write_errors_total") >= 1);
  // Ready (it answers), and says what is wrong.
  const auto [ready_status, ready_body] = env.agent.http_get("/readyz");
  CHECK(ready_status == 200);
  CHECK(ready_body.find("audit log") != std::string::npos);

  disk.free_space();
  CHECK(wait_until([&] { return metric(env.agent, "hsm_agent_audit_failing") == 0; }, 10s));
  CHECK(wait_until([&] { return signatures_audited(disk.audit_log()) == kWhileFull + 1; }));
  CHECK(metric(env.agent, "hsm_agent_audit_dropped_lines_total") == 0);
  CHECK(sign(connection, "after") == "ok");
  CHECK(env.agent.stop().code == 0);
  CHECK(signatures_audited(disk.audit_log()) == kWhileFull + 2);
}
