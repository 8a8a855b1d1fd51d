// Security of the real agent against callers that are NOT root (issue 6, docs/security.md and
// docs/policy.md): the runner is root, so each caller is a forked child that drops to another
// uid/gid (setgroups, setgid, setuid) before it connects. Two shapes:
//   - connect_as(): the child only connect()s a socket the parent created and exits; the kernel
//     recorded the child's credentials on the connection (SO_PEERCRED is taken at connect), so
//     the test then drives that connection itself, byte-exact and synchronously;
//   - run_as(): the child runs hsm::Client as that uid and reports through a pipe.
// The socket directory is traversable by everyone and the socket's group (--socket-group) is a
// supplementary group of the callers, as a pod's fsGroup is: the kernel lets them open the
// socket, the agent's policy decides the rest.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "fixtures/polling.hpp"
#include "integration/running_agent.hpp"

using namespace hsm::test;
using namespace std::chrono_literals;
namespace protocol = hsm::protocol;
using protocol::ErrorCode;
using protocol::Method;

namespace {

// ---- identities -----------------------------------------------------------------------------

/// A caller's credentials. `groups` are supplementary groups (not seen by SO_PEERCRED).
struct Identity {
  uid_t uid;
  gid_t gid;
  std::vector<gid_t> groups;
};

constexpr gid_t kSocketGroup = 10000;  // the socket's group, like a pod's fsGroup
const Identity kApp{10001, 10001, {kSocketGroup}};
const Identity kStranger{10002, 10002, {kSocketGroup}};
const Identity kTeamMember{10003, 20000, {kSocketGroup}};  // primary gid 20000
const Identity kAdmin{10004, 10004, {kSocketGroup}};
const Identity kAppWithoutSocketGroup{10001, 10001, {}};

// In a forked child: become `who`, for good (no way back to root).
void become(const Identity& who) {
  if (::setgroups(who.groups.size(), who.groups.data()) != 0 || ::setgid(who.gid) != 0 ||
      ::setuid(who.uid) != 0 || ::setuid(0) == 0) {
    ::_exit(126);
  }
}

/// Connects to `path` as `who` (a child process connects the parent's socket, then exits).
/// Returns the connected fd, or -errno of the child's connect().
int connect_as(const Identity& who, const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    become(who);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    const int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    ::_exit(rc == 0 ? 0 : (errno & 0x7f));
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) != 126);  // could not switch uid: the runner must be root
  if (WEXITSTATUS(status) != 0) {
    ::close(fd);
    return -WEXITSTATUS(status);
  }
  return fd;
}

/// A child started by start_as(): its pid and the read end of the pipe it reports through.
struct ChildAs {
  pid_t pid;
  int report_fd;
};

/// Starts `body` in a child as `who`; collect() returns what it returned (or "exception: ...").
/// The parent must have no threads of its own (no hsm::Client alive) when it calls this.
ChildAs start_as(const Identity& who, const std::function<std::string()>& body) {
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(pipe_fds[0]);
    become(who);
    std::string out;
    try {
      out = body();
    } catch (const std::exception& e) {
      out = std::string("exception: ") + e.what();
    }
    std::string_view rest = out;
    while (!rest.empty()) {
      const ssize_t n = ::write(pipe_fds[1], rest.data(), rest.size());
      if (n <= 0) break;
      rest.remove_prefix(static_cast<std::size_t>(n));
    }
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  return {pid, pipe_fds[0]};
}

/// What a child started by start_as() reported; it is killed if it has not finished in 120 s.
std::string collect(const ChildAs& child) {
  const int report_fd = child.report_fd;
  const pid_t pid = child.pid;
  std::string out;
  const auto until = std::chrono::steady_clock::now() + 120s;
  char buffer[4096];
  for (;;) {
    pollfd p{report_fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    const int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) break;
    const ssize_t n = ::read(report_fd, buffer, sizeof(buffer));
    if (n <= 0) break;
    out.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(report_fd);
  ::kill(pid, SIGKILL);  // no-op when it has finished; never leave a child behind
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return out;
}

/// Runs `body` in a child as `who` and returns what it returned (or "exception: ...").
std::string run_as(const Identity& who, const std::function<std::string()>& body) {
  return collect(start_as(who, body));
}

// ---- requests sent on a connection made by another uid (RawConnection::adopt) ----------------

std::uint32_t next_msgid() {
  static std::uint32_t id = 1;
  return id++;
}

protocol::Request request(Method method, protocol::Params params = protocol::EmptyParams{}) {
  return protocol::Request{next_msgid(), method, std::move(params), std::nullopt};
}
protocol::Request sign_request(const std::string& kid, const std::string& data = "payload") {
  protocol::SignParams params;
  params.kid = kid;
  params.input.data = protocol::Bytes(data.begin(), data.end());
  return request(Method::kSign, params);
}
protocol::Request generate_request(const std::string& kid) {
  return request(Method::kGenerateKey, protocol::GenerateKeyParams{kid, "ES256", std::nullopt});
}
protocol::Request delete_request(const std::string& kid) {
  return request(Method::kDeleteKey, protocol::KidParams{kid});
}

/// The error of an answer, or nullopt when it succeeded (a missing answer fails the test).
std::optional<protocol::Error> error_of(const std::optional<protocol::Response>& response) {
  REQUIRE(response.has_value());
  if (const auto* error = std::get_if<protocol::Error>(&response->body)) return *error;
  return std::nullopt;
}
bool succeeded(const std::optional<protocol::Response>& response) {
  return !error_of(response).has_value();
}
bool denied(const std::optional<protocol::Response>& response) {
  const auto error = error_of(response);
  return error && error->code == ErrorCode::kPermissionDenied;
}

// ---- files, agents, logs --------------------------------------------------------------------

/// A temporary directory everyone may traverse (callers run as other uids), removed at the end.
struct SharedDir {
  SharedDir() : path(make_temp_dir("hsm-security")) {
    std::filesystem::permissions(
        path, std::filesystem::perms::owner_all | std::filesystem::perms::group_read |
                  std::filesystem::perms::group_exec | std::filesystem::perms::others_read |
                  std::filesystem::perms::others_exec);
  }
  ~SharedDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  [[nodiscard]] std::filesystem::path socket() const { return path / "agent.sock"; }
  std::filesystem::path path;
};

/// Writes `text` to `path` atomically (as a ConfigMap update or an editor would), mode 0644.
void write_file(const std::filesystem::path& path, const std::string& text, mode_t mode = 0644) {
  const auto temporary = path.string() + ".new";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
  }
  REQUIRE(::chmod(temporary.c_str(), mode) == 0);
  std::filesystem::rename(temporary, path);
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

bool contains_all(const std::string& line, std::initializer_list<std::string> parts) {
  return std::all_of(parts.begin(), parts.end(),
                     [&](const std::string& part) { return line.find(part) != std::string::npos; });
}

int count_of(const std::string& text, const std::string& needle) {
  int n = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

/// Waits (bounded) for an audit line (the agent's stdout) holding every part; the audit log is
/// written by its own thread, so a line may trail the answer that it records.
bool audited(const AgentProcess& agent, std::initializer_list<std::string> parts) {
  return wait_until([&] {
    for (const auto& line : lines_of(agent.stdout_text())) {
      if (contains_all(line, parts)) return true;
    }
    return false;
  });
}

std::string peer_uid(const Identity& who) {
  return "\"uid\":" + std::to_string(who.uid) + ",";
}

/// The agent on `token`, its socket in `dir` with group kSocketGroup, plus `args`.
AgentOptions agent_options(const SharedDir& dir, std::vector<std::string> args) {
  std::vector<std::string> all = {"--socket-group", std::to_string(kSocketGroup)};
  all.insert(all.end(), args.begin(), args.end());
  return AgentOptions{.extra_args = all, .socket = dir.socket()};
}

// The policy of the deployment examples (docs/policy.md), with root as key administrator so
// that the test can create keys.
std::string app_policy() {
  return "rules:\n"
         "  - name: app-signers\n"
         "    match: { uids: [10001] }\n"
         "    methods: [sign, verify, get_public_key, health, capabilities]\n"
         "    kids: [\"app-*\"]\n"
         "  - name: key-admin\n"
         "    match: { uids: [0] }\n"
         "    methods: [\"*\"]\n"
         "    kids: [\"*\"]\n";
}

std::map<std::string, std::string> token_env(const SoftHsmToken& token) {
  return {{"SOFTHSM2_CONF", token.config_path().string()}};
}

std::vector<std::string> base_args(const SoftHsmToken& token, const std::string& socket) {
  return {"--module",         kSoftHsmModule,
          "--token-label",    token.label(),
          "--pin-file",       token.write_pin_file().string(),
          "--socket",         socket,
          "--metrics-listen", ""};
}

}  // namespace

// ---- the policy file ------------------------------------------------------------------------

TEST_CASE("policy: a caller granted sign on app-* signs with app keys and nothing else",
          "[security][policy]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  AgentProcess agent(token, agent_options(dir, {"--policy", policy.string()}));

  Bytes app_spki;
  {
    hsm::Client root(agent.socket_path());
    root.generate_key("app-payments", "ES256");
    root.generate_key("admin-key", "ES256");
    app_spki = root.get_public_key("app-payments").spki;
  }

  // hsm::Client itself, as uid 10001.
  const std::string report = run_as(kApp, [&] {
    hsm::Client client(agent.socket_path());
    std::string out;
    const auto signature = client.sign("app-payments", std::string_view("signing input"));
    out += "sig " + base64url_encode(signature) + "\n";
    const auto attempt = [&](const std::string& what, const std::function<void()>& call) {
      try {
        call();
        out += what + " ok\n";
      } catch (const hsm::Error& e) {
        out += what + " " + e.code() + " " + e.what() + "\n";
      }
    };
    attempt("sign-admin", [&] { (void)client.sign("admin-key", std::string_view("x")); });
    attempt("generate", [&] { client.generate_key("app-new"); });
    attempt("delete", [&] { client.delete_key("app-payments"); });
    attempt("list", [&] { (void)client.list_keys(); });
    attempt("health", [&] { (void)client.health(); });
    return out;
  });
  INFO(report);
  const auto lines = lines_of(report);
  REQUIRE(lines.size() == 6);
  REQUIRE(lines[0].rfind("sig ", 0) == 0);
  CHECK(verify_with_spki(app_spki, "ES256", to_bytes("signing input"),
                         base64url_decode(lines[0].substr(4))));
  // Denied by kid pattern: named by method and kid, never by rule.
  CHECK(contains_all(lines[1], {"sign-admin permission_denied", "sign", "'admin-key'"}));
  CHECK(contains_all(lines[2], {"generate permission_denied", "generate_key", "'app-new'"}));
  CHECK(contains_all(lines[3], {"delete permission_denied", "delete_key", "'app-payments'"}));
  CHECK(contains_all(lines[4], {"list permission_denied", "list_keys"}));  // denied by method
  CHECK(lines[5] == "health ok");
  CHECK(report.find("app-signers") == std::string::npos);
  CHECK(report.find("key-admin") == std::string::npos);

  // Nothing the caller tried changed the token.
  {
    hsm::Client root(agent.socket_path());
    std::vector<std::string> kids;
    for (const auto& key : root.list_keys()) kids.push_back(key.kid);
    std::sort(kids.begin(), kids.end());
    CHECK(kids == std::vector<std::string>{"admin-key", "app-payments"});
  }

  // Every decision is audited with the caller's uid.
  const auto uid = peer_uid(kApp);
  CHECK(audited(agent, {R"("method":"sign")", R"("kid":"app-payments")", R"("result":"ok")", uid}));
  CHECK(audited(agent, {R"("method":"sign")", R"("kid":"admin-key")",
                        R"("result":"permission_denied")", uid}));
  CHECK(audited(agent, {R"("method":"generate_key")", R"("kid":"app-new")",
                        R"("result":"permission_denied")", uid}));
  CHECK(audited(agent, {R"("method":"delete_key")", R"("result":"permission_denied")", uid}));
  CHECK(audited(agent, {R"("method":"list_keys")", R"("result":"permission_denied")", uid}));
}

TEST_CASE("policy: a uid that no rule selects is refused at accept, and audited",
          "[security][policy]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  AgentProcess agent(token, agent_options(dir, {"--policy", policy.string()}));

  // The kernel lets it in (it is in the socket's group); the agent closes at once, unanswered.
  auto stranger = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
  stranger.send(request(Method::kCapabilities));
  CHECK_FALSE(stranger.receive_response(Method::kCapabilities, 10s).has_value());
  CHECK(stranger.closed_by_peer());
  CHECK(audited(agent, {R"("event":"connection_refused")", R"("result":"permission_denied")",
                        peer_uid(kStranger)}));
  CHECK(agent.stderr_text().find("connection refused (policy)") != std::string::npos);

  // hsm::Client as that uid gets no answer either; uid 10001 on the same socket is served.
  const std::string report = run_as(kStranger, [&] {
    hsm::ClientOptions options;
    options.socket_path = agent.socket_path();
    options.timeout = 3s;
    hsm::Client client(options);
    try {
      (void)client.capabilities();
      return std::string("answered");
    } catch (const hsm::Error& e) {
      return std::string("refused ") + e.code();
    }
  });
  CHECK(report.rfind("refused ", 0) == 0);
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  CHECK(succeeded(app.call(request(Method::kCapabilities))));
  CHECK(agent.running());
}

TEST_CASE("policy: rules select by gid too, and the first rule that selects a caller decides",
          "[security][policy]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  // 10003 has primary gid 20000 but its own rule comes first: health only.
  write_file(policy,
             "rules:\n"
             "  - match: { uids: [10003] }\n"
             "    methods: [health]\n"
             "  - match: { gids: [20000, 10001] }\n"
             "    methods: [sign]\n"
             "    kids: [\"team-*\"]\n"
             "  - match: { uids: [0] }\n"
             "    methods: [\"*\"]\n"
             "    kids: [\"*\"]\n");
  AgentProcess agent(token, agent_options(dir, {"--policy", policy.string()}));
  { hsm::Client(agent.socket_path()).generate_key("team-a"); }

  auto member = RawConnection::adopt(connect_as(kTeamMember, agent.socket_path()));
  CHECK(denied(member.call(sign_request("team-a"))));
  CHECK(succeeded(member.call(request(Method::kHealth))));
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));  // gid 10001
  CHECK(succeeded(app.call(sign_request("team-a"))));
  CHECK(denied(app.call(request(Method::kHealth))));
}

TEST_CASE("policy: a bad policy file stops the agent with the file, line and problem",
          "[security][policy]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  const auto socket = dir.socket().string();
  auto args = base_args(token, socket);
  args.insert(args.end(), {"--policy", policy.string()});
  std::string expect;
  std::string detail;
  mode_t mode = 0644;

  SECTION("an unknown method, on line 4") {
    write_file(policy,
               "rules:\n  - match: { uids: [10001] }\n    kids: [\"*\"]\n"
               "    methods: [sign, sgn]\n");
    expect = policy.string() + ":4:";
    detail = "unknown method 'sgn'";
  }
  SECTION("not YAML, on line 3") {
    write_file(policy, "rules:\n  - match: { uids: [10001] }\n    methods: [sign\n");
    expect = policy.string() + ":";
  }
  SECTION("sign without kids, rule on line 2") {
    write_file(policy, "rules:\n  - match: { uids: [10001] }\n    methods: [sign]\n");
    expect = policy.string() + ":2:";
  }
  SECTION("a policy file others may write") {
    write_file(policy, app_policy(), 0666);
    mode = 0666;
    expect = policy.string();
    detail = "writable";
  }
  SECTION("--policy together with --allow-uid") {
    write_file(policy, app_policy());
    args.insert(args.end(), {"--allow-uid", "10001"});
    expect = policy.string() + ": --allow-uid";
    detail = "only without --policy";
  }
  INFO("policy mode " << std::oct << mode);
  const auto result = run_agent(args, token_env(token));
  INFO(result.err);
  CHECK(result.status.exited);
  CHECK(result.status.code == 2);
  CHECK(result.err.find("hsm-agent: " + expect) != std::string::npos);
  CHECK(result.err.find(detail) != std::string::npos);
  CHECK(result.err.find(token.user_pin()) == std::string::npos);
  CHECK_FALSE(std::filesystem::exists(socket));  // it never listened
}

TEST_CASE("policy: SIGHUP reloads without dropping connections, and a bad file keeps the old rules",
          "[security][policy][reload]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  AgentProcess agent(token, agent_options(dir, {"--policy", policy.string()}));
  {
    hsm::Client root(agent.socket_path());
    root.generate_key("app-a");
    root.generate_key("other-b");
  }
  const auto loads = [&] { return count_of(agent.stderr_text(), "access: policy file"); };
  REQUIRE(loads() == 1);

  auto app =
      RawConnection::adopt(connect_as(kApp, agent.socket_path()));  // held through every reload
  CHECK(succeeded(app.call(sign_request("app-a"))));
  CHECK(denied(app.call(sign_request("other-b"))));

  // A good new policy: from the next request on, the same connection gets the new answers.
  write_file(policy,
             "rules:\n"
             "  - match: { uids: [10001] }\n"
             "    methods: [sign]\n"
             "    kids: [\"other-*\"]\n"
             "  - match: { uids: [0] }\n"
             "    methods: [\"*\"]\n"
             "    kids: [\"*\"]\n");
  agent.signal(SIGHUP);
  REQUIRE(wait_until([&] { return loads() == 2; }));
  CHECK(denied(app.call(sign_request("app-a"))));
  CHECK(succeeded(app.call(sign_request("other-b"))));

  // A bad one: logged with its line, and the rules in force stay.
  write_file(policy, "rules:\n  - match: { uids: [10001] }\n    methods: [sing]\n");
  agent.signal(SIGHUP);
  REQUIRE(wait_until(
      [&] { return agent.stderr_text().find("policy not reloaded") != std::string::npos; }));
  CHECK(agent.stderr_text().find(policy.string() + ":3:") != std::string::npos);
  CHECK(loads() == 2);
  CHECK(succeeded(app.call(sign_request("other-b"))));
  CHECK(denied(app.call(sign_request("app-a"))));

  // A policy that no longer selects the caller: its open connection stays, every request is
  // denied; a new connection is refused.
  write_file(policy, "rules:\n  - match: { uids: [0] }\n    methods: [\"*\"]\n    kids: [\"*\"]\n");
  agent.signal(SIGHUP);
  REQUIRE(wait_until([&] { return loads() == 3; }));
  CHECK(denied(app.call(sign_request("other-b"))));
  CHECK(denied(app.call(request(Method::kCapabilities))));
  auto again = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  CHECK(again.closed_by_peer());
  CHECK(agent.running());
}

// ---- without a policy file ------------------------------------------------------------------

TEST_CASE("default access: only root and the agent's uid, then --allow-uid/--allow-gid/--admin-uid",
          "[security][default]") {
  SoftHsmToken token;
  SharedDir dir;

  SECTION("no flags: another uid is refused at accept; root may do everything") {
    AgentProcess agent(token, agent_options(dir, {}));
    auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
    CHECK(app.closed_by_peer());
    CHECK(audited(agent, {R"("event":"connection_refused")", peer_uid(kApp)}));
    hsm::Client root(agent.socket_path());
    root.generate_key("k");
    CHECK(root.delete_key("k"));
  }
  SECTION("--allow-uid and --allow-gid: every non-admin method on every kid") {
    AgentProcess agent(token, agent_options(dir, {"--allow-uid", "10001", "--allow-gid", "20000"}));
    { hsm::Client(agent.socket_path()).generate_key("any-kid"); }
    for (const auto* who : {&kApp, &kTeamMember}) {
      INFO("uid " << who->uid);
      auto caller = RawConnection::adopt(connect_as(*who, agent.socket_path()));
      CHECK(succeeded(caller.call(sign_request("any-kid"))));
      CHECK(succeeded(caller.call(request(Method::kListKeys))));
      CHECK(succeeded(caller.call(request(Method::kGetPublicKey, protocol::KidParams{"any-kid"}))));
      const auto generate = error_of(caller.call(generate_request("mine")));
      REQUIRE(generate);
      CHECK(generate->code == ErrorCode::kPermissionDenied);
      CHECK(generate->message.find("generate_key on kid 'mine'") != std::string::npos);
      CHECK(denied(caller.call(delete_request("any-kid"))));
      CHECK(audited(agent, {R"("method":"generate_key")", R"("result":"permission_denied")",
                            peer_uid(*who)}));
    }
    auto stranger = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
    CHECK(stranger.closed_by_peer());
  }
  SECTION("--admin-uid: may also generate and delete keys") {
    AgentProcess agent(token, agent_options(dir, {"--admin-uid", "10004", "--allow-uid", "10001"}));
    auto admin = RawConnection::adopt(connect_as(kAdmin, agent.socket_path()));
    CHECK(succeeded(admin.call(generate_request("made-by-admin"))));
    CHECK(succeeded(admin.call(sign_request("made-by-admin"))));
    auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
    CHECK(denied(app.call(delete_request("made-by-admin"))));
    CHECK(succeeded(admin.call(delete_request("made-by-admin"))));
    CHECK(audited(agent, {R"("method":"generate_key")", R"("result":"ok")", peer_uid(kAdmin)}));
    CHECK(audited(agent, {R"("method":"delete_key")", R"("result":"ok")", peer_uid(kAdmin)}));
  }
  SECTION("--read-only removes generate and delete, even for admins and root") {
    AgentProcess agent(token, agent_options(dir, {"--admin-uid", "10004", "--read-only"}));
    auto admin = RawConnection::adopt(connect_as(kAdmin, agent.socket_path()));
    const auto generate = error_of(admin.call(generate_request("nope")));
    REQUIRE(generate);
    CHECK(generate->code == ErrorCode::kPermissionDenied);
    CHECK(generate->message.find("read-only") != std::string::npos);
    CHECK(succeeded(admin.call(request(Method::kListKeys))));
    hsm::Client root(agent.socket_path());
    try {
      root.generate_key("nope-either");
      FAIL("a read-only agent let root create a key");
    } catch (const hsm::Error& e) {
      CHECK(e.code() == "permission_denied");
    }
  }
}

// ---- the socket -----------------------------------------------------------------------------

TEST_CASE("socket: --socket-mode and --socket-group decide who the kernel lets connect",
          "[security][socket]") {
  SoftHsmToken token;
  SharedDir dir;
  struct stat st {};

  SECTION("0660 with the callers' group: members connect, others get EACCES") {
    AgentProcess agent(token, agent_options(dir, {"--allow-uid", "10001"}));
    REQUIRE(::lstat(agent.socket_path().c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 07777) == 0660);
    CHECK(st.st_gid == kSocketGroup);
    CHECK(st.st_uid == ::getuid());
    auto member = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
    CHECK(succeeded(member.call(request(Method::kHealth))));
    CHECK(connect_as(kAppWithoutSocketGroup, agent.socket_path()) == -EACCES);
  }
  SECTION("0600: only the agent's uid") {
    AgentProcess agent(token,
                       agent_options(dir, {"--allow-uid", "10001", "--socket-mode", "0600"}));
    REQUIRE(::lstat(agent.socket_path().c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
    CHECK(connect_as(kApp, agent.socket_path()) == -EACCES);
  }
  SECTION("a group by name") {
    const struct group* daemon_group = ::getgrnam("daemon");
    REQUIRE(daemon_group != nullptr);
    AgentProcess agent(
        token, AgentOptions{.extra_args = {"--socket-group", "daemon"}, .socket = dir.socket()});
    REQUIRE(::lstat(agent.socket_path().c_str(), &st) == 0);
    CHECK(st.st_gid == daemon_group->gr_gid);
  }
  SECTION("modes that open the socket to others are refused at start") {
    for (const char* mode : {"0666", "0662", "0604"}) {
      auto args = base_args(token, dir.socket().string());
      args.insert(args.end(), {"--socket-mode", mode});
      const auto result = run_agent(args, token_env(token));
      CHECK(result.status.code == 2);
      CHECK(result.err.find("grants access to others") != std::string::npos);
    }
    auto args = base_args(token, dir.socket().string());
    args.insert(args.end(), {"--socket-group", "no-such-group-hsm"});
    const auto result = run_agent(args, token_env(token));
    CHECK(result.status.code != 0);
    CHECK(result.err.find("no-such-group-hsm") != std::string::npos);
  }
}

TEST_CASE(
    "socket: a directory others may write is refused, except a mounted volume with "
    "--shared-socket-dir",
    "[security][socket][shared-dir]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto open_dir = dir.path / "emptydir";
  std::filesystem::create_directory(open_dir);
  REQUIRE(::chmod(open_dir.c_str(), 0777) == 0);
  const auto socket = (open_dir / "agent.sock").string();
  auto args = base_args(token, socket);

  SECTION("a plain 0777 directory, with or without the flag") {
    auto result = run_agent(args, token_env(token));
    CHECK(result.status.code != 0);
    CHECK(result.err.find("writable by others and not sticky") != std::string::npos);
    args.push_back("--shared-socket-dir");
    result = run_agent(args, token_env(token));
    CHECK(result.status.code != 0);
    CHECK(result.err.find("is not a mount point") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(socket));
  }
  SECTION("a 0777 tmpfs mount, like a Kubernetes emptyDir with medium: Memory") {
    // A private mount namespace for this process and its children (the agent), so the mount
    // disappears with the test binary whatever happens.
    if (::unshare(CLONE_NEWNS) != 0 ||
        ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("tmpfs", open_dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0777,size=1m") !=
            0) {
      FAIL("cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): " << std::strerror(errno));
    }
    struct stat st {};
    REQUIRE(::stat(open_dir.c_str(), &st) == 0);
    REQUIRE((st.st_mode & 07777) == 0777);

    const auto refused = run_agent(args, token_env(token));
    CHECK(refused.status.code != 0);
    CHECK(refused.err.find("--shared-socket-dir") != std::string::npos);  // the hint

    AgentProcess agent(
        token, AgentOptions{.extra_args = {"--shared-socket-dir", "--socket-group",
                                           std::to_string(kSocketGroup), "--allow-uid", "10001"},
                            .socket = socket});
    CHECK(agent.stderr_text().find("shared volume") != std::string::npos);
    REQUIRE(::lstat(socket.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0660);
    { hsm::Client(socket).generate_key("pod-key"); }
    auto app = RawConnection::adopt(connect_as(kApp, socket));
    CHECK(succeeded(app.call(sign_request("pod-key"))));
    agent.stop();
    ::umount2(open_dir.c_str(), MNT_DETACH);
  }
}

// ---- the PIN --------------------------------------------------------------------------------

TEST_CASE("PIN: never in argv, environ or any log line at debug level, whatever callers do",
          "[security][pin]") {
  SoftHsmToken token("pin-security", "80417263");
  const std::string pin = token.user_pin();
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  for (bool from_env : {false, true}) {
    INFO((from_env ? "HSM_AGENT_PIN" : "--pin-file"));
    AgentProcess agent(token,
                       AgentOptions{.extra_args = {"--policy", policy.string(), "--socket-group",
                                                   std::to_string(kSocketGroup)},
                                    .pin_from_env = from_env,
                                    .socket = dir.socket()});
    const auto proc = [&](const char* what) {
      std::ifstream in("/proc/" + std::to_string(agent.pid()) + "/" + what, std::ios::binary);
      return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    };
    {
      // Successes, denials, refusals and errors: every path that logs or audits.
      hsm::Client root(agent.socket_path());
      const std::string kid = from_env ? "app-pin-env" : "app-pin-file";
      root.generate_key(kid);
      (void)root.sign(kid, std::string_view(pin));  // the PIN as data is hashed, never shown
      auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
      CHECK(denied(app.call(sign_request("root-only"))));
      CHECK(error_of(app.call(sign_request("app-missing"))).has_value());
      auto stranger = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
      CHECK(stranger.closed_by_peer());
    }
    agent.signal(SIGHUP);
    REQUIRE(wait_until([&] { return count_of(agent.stderr_text(), "access: policy file") == 2; }));
    const auto cmdline = proc("cmdline");
    const auto environ_block = proc("environ");
    CHECK_FALSE(cmdline.empty());
    CHECK(cmdline.find(pin) == std::string::npos);
    CHECK(environ_block.find(pin) == std::string::npos);
    CHECK(environ_block.find("HSM_AGENT_PIN") == std::string::npos);
    agent.stop();
    const auto logs = agent.stderr_text();
    CHECK(logs.find(" debug ") != std::string::npos);  // debug lines were written
    CHECK(logs.find(pin) == std::string::npos);
    CHECK(agent.stdout_text().find(pin) == std::string::npos);
  }
}

TEST_CASE("PIN: a PIN file readable by others or a foreign group draws a warning",
          "[security][pin]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto pin_file = token.write_pin_file();
  struct Case {
    mode_t mode;
    gid_t group;
    bool warned;
  };
  // The agent runs as root here: group 0 is its own (as fsGroup is the agent's in a pod).
  for (const Case& c : {Case{0600, 0, false}, Case{0400, 0, false}, Case{0440, 0, false},
                        Case{0640, kSocketGroup, true}, Case{0644, 0, true}, Case{0604, 0, true}}) {
    INFO("mode " << std::oct << c.mode << std::dec << " group " << c.group);
    REQUIRE(::chown(pin_file.c_str(), 0, c.group) == 0);
    REQUIRE(::chmod(pin_file.c_str(), c.mode) == 0);
    auto args = base_args(token, dir.socket().string());
    args[5] = pin_file.string();
    args[1] = "/nonexistent/stop-here.so";
    args.insert(args.end(), {"--log-level", "debug"});
    // A module that does not exist stops the agent right after the PIN is read, so the test
    // needs no running agent.
    const auto result = run_agent(args, token_env(token));
    CHECK(result.status.code != 0);
    CHECK((result.err.find("readable by group or others") != std::string::npos) == c.warned);
    CHECK(result.err.find(token.user_pin()) == std::string::npos);
  }
}

// ---- rate limits ----------------------------------------------------------------------------

TEST_CASE("rate limit: a uid flooding gets overloaded while another uid keeps being served",
          "[security][rate-limit]") {
  SoftHsmToken token;
  SharedDir dir;
  AgentProcess agent(token, agent_options(dir, {"--allow-uid", "10001,10002", "--rate-limit", "1",
                                                "--rate-burst", "5"}));
  auto noisy = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  auto quiet = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));

  constexpr int kFlood = 100;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < kFlood; ++i) REQUIRE(noisy.send(request(Method::kCapabilities)));
  // While the flood is in the agent's hands, the neighbour's requests all pass.
  int quiet_ok = 0;
  for (int i = 0; i < 5; ++i) quiet_ok += succeeded(quiet.call(request(Method::kHealth))) ? 1 : 0;
  int noisy_ok = 0, noisy_overloaded = 0;
  for (int i = 0; i < kFlood; ++i) {
    const auto answer = noisy.receive_response(Method::kCapabilities, 30s);
    if (succeeded(answer)) {
      ++noisy_ok;
    } else if (error_of(answer)->code == ErrorCode::kOverloaded) {
      ++noisy_overloaded;
    }
  }
  const auto elapsed_s =
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - started)
          .count();
  CHECK(quiet_ok == 5);
  CHECK(noisy_ok + noisy_overloaded == kFlood);
  // At most the burst plus one token per second that passed (however slow the machine was).
  CHECK(noisy_ok >= 1);
  CHECK(noisy_ok <= 5 + elapsed_s + 1);
  CHECK(audited(agent, {R"("method":"capabilities")", R"("result":"overloaded")", peer_uid(kApp)}));
  for (const auto& line : lines_of(agent.stdout_text())) {
    if (line.find(R"("result":"overloaded")") != std::string::npos) {
      CHECK(line.find(peer_uid(kStranger)) == std::string::npos);
    }
  }
}

// ---- a refused caller flooding the socket ---------------------------------------------------

TEST_CASE("flood: a refused uid connecting in a loop cannot drown the audit trail or stall signing",
          "[security][flood]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto audit_path = dir.path / "audit.log";
  AgentProcess agent(
      token, agent_options(dir, {"--allow-uid", "10001", "--audit-log", audit_path.string()}));
  { hsm::Client(agent.socket_path()).generate_key("flood-key"); }
  REQUIRE(wait_until([&] { return std::filesystem::file_size(audit_path) > 0; }));
  const auto audit_before = std::filesystem::file_size(audit_path);
  const auto log_before = agent.stderr_text().size();

  // The refused uid connects and closes as fast as it can for 10 s; the allowed one signs at
  // its own pace, 100 signatures a second, from 0.5 s into the flood to 0.5 s before its end.
  constexpr auto kFlood = 10s;
  const std::string socket = agent.socket_path();
  const auto flood_started = std::chrono::steady_clock::now();
  const ChildAs flooder = start_as(kStranger, [&] {
    long connects = 0;
    long failures = 0;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
    const auto until = std::chrono::steady_clock::now() + kFlood;
    while (std::chrono::steady_clock::now() < until) {
      const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
        ++connects;
      } else {
        ++failures;
      }
      ::close(fd);
    }
    return std::to_string(connects) + " " + std::to_string(failures);
  });
  const ChildAs signer = start_as(kApp, [&] {
    std::this_thread::sleep_for(500ms);
    // The client's default retries: its first connect may find the listen backlog full.
    hsm::Client client(socket);
    std::vector<double> latencies_ms;
    const auto until = std::chrono::steady_clock::now() + kFlood - 1s;
    for (auto next = std::chrono::steady_clock::now(); next < until; next += 10ms) {
      std::this_thread::sleep_until(next);
      const auto start = std::chrono::steady_clock::now();
      (void)client.sign("flood-key", std::string_view("payload"));
      latencies_ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    std::sort(latencies_ms.begin(), latencies_ms.end());
    const double p99 = latencies_ms.at(latencies_ms.size() * 99 / 100);
    return std::to_string(latencies_ms.size()) + " " + std::to_string(p99) + " " +
           std::to_string(latencies_ms.back());
  });
  const std::string signed_report = collect(signer);
  const std::string flood_report = collect(flooder);
  const double flood_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - flood_started).count();
  INFO("signer: signatures p99_ms max_ms = " << signed_report);
  INFO("flooder: connects failures = " << flood_report);

  long connects = 0;
  long failures = 0;
  std::istringstream(flood_report) >> connects >> failures;
  std::size_t signatures = 0;
  double p99_ms = 1e9;
  double max_ms = 0;
  std::istringstream(signed_report) >> signatures >> p99_ms >> max_ms;
  REQUIRE(connects > 0);
  REQUIRE(signatures > 0);

  // The allowed app keeps its pace.
  CHECK(p99_ms < 50.0);

  // Every refused connection is counted, exactly.
  const auto rejected = [&] {
    const auto [status, text] = agent.http_get("/metrics");
    return status == 200
               ? metric_sample(text, R"(hsm_agent_connections_rejected_total{reason="policy"})")
               : -1.0;
  };
  CHECK(wait_until([&] { return rejected() == static_cast<double>(connects); }, 10s));
  INFO("rejected counter " << rejected());

  // The audit trail holds a summary, not a line per connection: at most one line per second for
  // the uid, whose counts add up to every refusal once the last summary is written (a timer
  // writes it a second after the previous one).
  const auto flooder_lines = [&] {
    std::vector<nlohmann::json> lines;
    std::ifstream in(audit_path);
    for (std::string line; std::getline(in, line);) {
      auto parsed = nlohmann::json::parse(line);  // every line is JSON
      if (parsed.value("event", "") == "connection_refused" &&
          parsed["peer"]["uid"] == kStranger.uid) {
        lines.push_back(std::move(parsed));
      }
    }
    return lines;
  };
  const auto counted = [&] {
    long sum = 0;
    for (const auto& line : flooder_lines()) sum += line.value("count", 1L);
    return sum;
  };
  CHECK(wait_until([&] { return counted() == connects; }, 10s));
  INFO("refusals in the audit log " << counted());
  CHECK(flooder_lines().size() <= static_cast<std::size_t>(flood_seconds) + 3);
  CHECK(std::filesystem::file_size(audit_path) - audit_before < 1024 * 1024);

  // The same for the log: one warning per second at most.
  const std::string log = agent.stderr_text().substr(log_before);
  CHECK(count_of(log, "connection refused (policy)") <= static_cast<int>(flood_seconds) + 3);
  CHECK(log.size() < 256 * 1024);
  CHECK(agent.running());
}
