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
#include <array>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "fixtures/command.hpp"
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

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  return addr;
}

/// Runs `step` in a child process as `who` and returns its result: 0, or an errno (at most 127).
int step_as(const Identity& who, const std::function<int()>& step) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    become(who);
    ::_exit(step() & 0x7f);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) != 126);  // could not switch uid: the runner must be root
  return WEXITSTATUS(status);
}

/// Connects to `path` as `who` (a child process connects the parent's socket, then exits).
/// Returns the connected fd, or -errno of the child's connect().
int connect_as(const Identity& who, const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  const int error = step_as(who, [&] {
    const auto addr = unix_address(path);
    return ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0 ? 0 : errno;
  });
  if (error != 0) {
    ::close(fd);
    return -error;
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
  params.input = hsm::protocol::Data{protocol::Bytes(data.begin(), data.end())};
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

/// A private mount namespace for this process and its children (the agent): what the test
/// mounts disappears with the test binary whatever happens. Needs root (CAP_SYS_ADMIN).
void enter_private_mount_namespace() {
  if (::unshare(CLONE_NEWNS) != 0 ||
      ::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    FAIL("cannot make a private mount namespace (needs root with CAP_SYS_ADMIN): "
         << std::strerror(errno));
  }
}

/// Creates the directory `path` with this owner, group and mode.
void make_dir(const std::filesystem::path& path, uid_t uid, gid_t gid, mode_t mode) {
  std::filesystem::create_directory(path);
  REQUIRE(::chown(path.c_str(), uid, gid) == 0);
  REQUIRE(::chmod(path.c_str(), mode) == 0);  // after chown, which clears set-id bits
}

/// As `who` (a child process): moves the file at `path` aside (to `path`.moved) and binds the
/// parent's unbound socket `fd` at `path` in its place, as a caller that may write the socket's
/// directory could. Returns 0, or the errno of the step that failed.
int take_over_socket_as(const Identity& who, int fd, const std::string& path) {
  return step_as(who, [&] {
    if (::rename(path.c_str(), (path + ".moved").c_str()) != 0) return errno;
    const auto addr = unix_address(path);
    return ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0 ? 0 : errno;
  });
}

/// The agent on a fresh token under app_policy() (the file in a directory everyone may traverse),
/// with `kids` created by root, the policy's key administrator.
struct AgentUnderAppPolicy {
  explicit AgentUnderAppPolicy(const std::vector<std::string>& kids)
      : agent(token, write_policy(dir, policy)) {
    hsm::Client root(agent.socket_path());
    for (const auto& kid : kids) root.generate_key(kid);
  }

  SoftHsmToken token;
  SharedDir dir;
  std::filesystem::path policy = dir.path / "policy.yaml";
  AgentProcess agent;

 private:
  static AgentOptions write_policy(const SharedDir& dir, const std::filesystem::path& policy) {
    write_file(policy, app_policy());
    return agent_options(dir, {"--policy", policy.string()});
  }
};

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

TEST_CASE("policy: a uid that no rule selects is refused, told why, and audited",
          "[security][policy]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  AgentProcess agent(token, agent_options(dir, {"--policy", policy.string()}));

  // The kernel lets it in (it is in the socket's group); the agent answers its first request
  // with permission_denied, naming the uid and the policy, and closes (issue 15: it saw only
  // "connection reset by peer" and chased socket permissions).
  auto stranger = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
  stranger.send(request(Method::kCapabilities));
  const auto refused = stranger.receive_response(Method::kCapabilities, 10s);
  REQUIRE(refused.has_value());
  const auto error = error_of(refused);
  REQUIRE(error.has_value());
  CHECK(error->code == ErrorCode::kPermissionDenied);
  CHECK(error->message.find("uid 10002") != std::string::npos);
  CHECK(error->message.find("policy") != std::string::npos);
  CHECK(stranger.closed_by_peer());
  // One that sends nothing is closed within about a second; one that sends more than a request
  // may hold is closed at once.
  auto silent = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
  CHECK(silent.closed_by_peer(5s));
  auto flood = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
  (void)flood.send(std::string(64 * 1024, '\x94'));
  CHECK(flood.closed_by_peer(5s));
  CHECK(audited(agent, {R"("event":"connection_refused")", R"("result":"permission_denied")",
                        peer_uid(kStranger)}));
  CHECK(agent.stderr_text().find("connection refused (policy)") != std::string::npos);

  // hsm::Client as that uid reports permission_denied, not a connection failure; uid 10001 on
  // the same socket is served.
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
  CHECK(report == "refused permission_denied");
  // hsmctl says so too: exit 3 (the agent's error, with its code), not 4 (cannot connect).
  const std::string hsmctl_report = run_as(kStranger, [&] {
    const std::string command =
        std::string("'") + HSMCTL_BINARY + "' --socket '" + agent.socket_path() + "' caps 2>&1";
    const auto [status, output] = run_command(command, Capture::kStdout);
    return std::to_string(status) + " " + output;
  });
  INFO("hsmctl: " << hsmctl_report);
  CHECK(hsmctl_report.rfind("3 ", 0) == 0);
  CHECK(hsmctl_report.find("permission_denied") != std::string::npos);
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
    CHECK(result.err.find("writable by others") != std::string::npos);
    CHECK(result.err.find(open_dir.string()) != std::string::npos);
    args.push_back("--shared-socket-dir");
    result = run_agent(args, token_env(token));
    CHECK(result.status.code != 0);
    CHECK(result.err.find("is not a mount point") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(socket));
  }
  SECTION("a 0777 tmpfs mount, like a Kubernetes emptyDir with medium: Memory") {
    enter_private_mount_namespace();
    if (::mount("tmpfs", open_dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0777,size=1m") !=
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

// ---- who can replace the socket or the policy (issue 15, items 6, 8 and 9) -------------------

TEST_CASE(
    "socket: a directory another uid could write, own or rename is refused at start, naming it "
    "and the fix",
    "[security][socket][trusted-path]") {
  SoftHsmToken token;
  SharedDir dir;
  auto socket_dir = dir.path / "run";
  std::string expect;
  std::string fix;

  SECTION("writable by the callers' group") {
    make_dir(socket_dir, 0, kSocketGroup, 0775);
    expect = socket_dir.string() + " is writable by group " + std::to_string(kSocketGroup);
    fix = "chmod g-w " + socket_dir.string();
  }
  SECTION("owned by another uid") {
    make_dir(socket_dir, kStranger.uid, kStranger.gid, 0755);
    expect = socket_dir.string() + " is owned by uid " + std::to_string(kStranger.uid);
    fix = "chown";
  }
  SECTION("under a parent that another uid owns (it could rename the directory away)") {
    const auto parent = dir.path / "theirs";
    make_dir(parent, kStranger.uid, kStranger.gid, 0755);
    socket_dir = parent / "run";
    make_dir(socket_dir, 0, 0, 0755);
    expect = parent.string() + " is owned by uid " + std::to_string(kStranger.uid);
    fix = "chown";
  }
  SECTION("sticky and writable by everyone, like /tmp") {
    make_dir(socket_dir, 0, 0, 01777);
    expect = socket_dir.string() + " is writable by others";
    fix = "sticky";
  }
  const auto socket = (socket_dir / "agent.sock").string();
  auto args = base_args(token, socket);
  args.insert(args.end(), {"--allow-uid", "10001"});
  // Before issue 15 the agent started (and ran until killed): a short bound keeps that failure
  // quick.
  const auto result = run_agent(args, token_env(token), 10s);
  INFO(result.err);
  CHECK(result.status.exited);
  CHECK(result.status.code == 1);
  CHECK(result.err.find("hsm-agent: socket directory " + socket_dir.string()) != std::string::npos);
  CHECK(result.err.find(expect) != std::string::npos);
  CHECK(result.err.find(fix) != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(socket));
}

TEST_CASE(
    "socket: the swap of issue 15 (a caller's group may write the socket's directory) cannot "
    "happen: the agent refuses to start there",
    "[security][socket][trusted-path]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto socket_dir = dir.path / "run";
  make_dir(socket_dir, 0, kSocketGroup, 0775);  // the callers' group may write it
  const auto socket = (socket_dir / "agent.sock").string();
  const auto policy = dir.path / "policy.yaml";
  write_file(policy, app_policy());
  try {
    AgentProcess agent(token,
                       AgentOptions{.extra_args = {"--policy", policy.string(), "--socket-group",
                                                   std::to_string(kSocketGroup)},
                                    .socket = socket});
    // The agent started: play the attack. The stranger moves the agent's socket aside and binds
    // its own at the path; the app's next connection reaches the stranger, while /readyz says
    // ready.
    const int attacker = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(attacker >= 0);
    const int moved = take_over_socket_as(kStranger, attacker, socket);
    REQUIRE(::chmod(socket.c_str(), 0666) == 0);
    REQUIRE(::listen(attacker, 4) == 0);
    const int app = connect_as(kApp, socket);
    pollfd p{attacker, POLLIN, 0};
    const bool reached_attacker = app >= 0 && ::poll(&p, 1, 2000) == 1;
    const auto [ready_status, ready_body] = agent.http_get("/readyz");
    if (app >= 0) ::close(app);
    ::close(attacker);
    FAIL("the agent started in a directory its callers' group may write; uid "
         << kStranger.uid << " moved its socket (errno " << moved << "), the app's connection "
         << (reached_attacker ? "reached the stranger's socket" : "failed") << ", /readyz "
         << ready_status << " " << ready_body);
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("exited during start (code 1)") != std::string::npos);
    CHECK(message.find(socket_dir.string() + " is writable by group " +
                       std::to_string(kSocketGroup)) != std::string::npos);
  }
  CHECK_FALSE(std::filesystem::exists(socket));
}

TEST_CASE(
    "socket: a symlinked directory on the way is followed when root or the agent owns the link, "
    "refused when another uid does",
    "[security][socket][trusted-path]") {
  SoftHsmToken token;
  SharedDir dir;
  const auto real = dir.path / "real";
  make_dir(real, 0, 0, 0755);

  SECTION("a link root owns: the socket is made in the real directory with its mode and group") {
    const auto link = dir.path / "link";
    std::filesystem::create_directory_symlink(real, link);
    AgentProcess linked(token,
                        AgentOptions{.extra_args = {"--socket-group", std::to_string(kSocketGroup),
                                                    "--allow-uid", "10001"},
                                     .socket = link / "agent.sock"});
    struct stat st {};
    REQUIRE(::lstat((real / "agent.sock").c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 07777) == 0660);
    CHECK(st.st_gid == kSocketGroup);
    REQUIRE(::lstat(link.c_str(), &st) == 0);
    CHECK(S_ISLNK(st.st_mode));  // the link itself is untouched
    CHECK(st.st_gid == 0);
    auto app = RawConnection::adopt(connect_as(kApp, (link / "agent.sock").string()));
    CHECK(succeeded(app.call(request(Method::kHealth))));
  }
  SECTION("a link another uid made in a sticky directory (it may replace its own links there)") {
    const auto sticky = dir.path / "tmp";
    make_dir(sticky, 0, 0, 01777);
    const auto link = sticky / "link";
    std::filesystem::create_directory_symlink(real, link);
    REQUIRE(::lchown(link.c_str(), kStranger.uid, kStranger.gid) == 0);
    const auto socket = (link / "agent.sock").string();
    const auto result = run_agent(base_args(token, socket), token_env(token), 10s);
    INFO(result.err);
    CHECK(result.status.code == 1);
    CHECK(result.err.find(link.string() + " is owned by uid " + std::to_string(kStranger.uid)) !=
          std::string::npos);
    CHECK_FALSE(std::filesystem::exists(real / "agent.sock"));
  }
}

TEST_CASE(
    "socket: deleted, the agent binds it again; replaced, /readyz says why until the path is "
    "free",
    "[security][socket][readyz]") {
  AgentUnderAppPolicy env({"app-a"});
  auto& agent = env.agent;
  const auto& dir = env.dir;
  const auto socket = agent.socket_path();
  const auto is_our_socket = [&] {
    struct stat st {};
    return ::lstat(socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
           (st.st_mode & 07777) == 0660 && st.st_gid == kSocketGroup;
  };
  const auto ready = [&] { return agent.http_get("/readyz").first == 200; };
  REQUIRE(ready());
  auto before = RawConnection::adopt(connect_as(kApp, socket));  // stays open throughout
  REQUIRE(succeeded(before.call(sign_request("app-a"))));

  SECTION("deleted: bound again within a tick or two, and new connections sign") {
    REQUIRE(::unlink(socket.c_str()) == 0);
    CHECK(wait_until(is_our_socket, 3s));
    CHECK(wait_until([&] { return agent.stderr_text().find("bound again") != std::string::npos; },
                     3s));
    CHECK(agent.stderr_text().find(socket) != std::string::npos);
    CHECK(wait_until(ready, 3s));
    auto app = RawConnection::adopt(connect_as(kApp, socket));
    CHECK(succeeded(app.call(sign_request("app-a"))));
  }
  SECTION("renamed and something else put in its place: not ready, nothing removed") {
    const auto moved = socket + ".moved";
    REQUIRE(::rename(socket.c_str(), moved.c_str()) == 0);
    { std::ofstream(socket) << "not the agent's"; }
    std::string reason;
    CHECK(wait_until(
        [&] {
          const auto [status, body] = agent.http_get("/readyz");
          reason = body;
          return status == 503;
        },
        3s));
    INFO(reason);
    CHECK(reason.find(socket) != std::string::npos);
    CHECK(reason.find("not this agent's socket") != std::string::npos);
    // It stays that way: the agent never removes a file it did not make.
    std::this_thread::sleep_for(1500ms);
    CHECK(agent.http_get("/readyz").first == 503);
    CHECK(std::filesystem::is_regular_file(socket));
    CHECK(succeeded(before.call(sign_request("app-a"))));  // open connections are unaffected

    // Once the path is free again the agent binds it again.
    std::filesystem::remove(socket);
    CHECK(wait_until(is_our_socket, 3s));
    CHECK(wait_until(ready, 3s));
    auto app = RawConnection::adopt(connect_as(kApp, socket));
    CHECK(succeeded(app.call(sign_request("app-a"))));
    CHECK(std::filesystem::is_socket(moved));  // the old one is left where it was put
  }
  SECTION("deleted while the directory no longer passes the check: not bound again") {
    REQUIRE(::chmod(dir.path.c_str(), 0775) == 0);  // writable by group root now
    REQUIRE(::unlink(socket.c_str()) == 0);
    std::string reason;
    CHECK(wait_until(
        [&] {
          const auto [status, body] = agent.http_get("/readyz");
          reason = body;
          return status == 503 && body.find("writable by group") != std::string::npos;
        },
        3s));
    INFO(reason);
    CHECK_FALSE(std::filesystem::exists(socket));
    REQUIRE(::chmod(dir.path.c_str(), 0755) == 0);
    CHECK(wait_until(is_our_socket, 3s));
    CHECK(wait_until(ready, 3s));
  }
  CHECK(agent.running());
}

TEST_CASE("policy: a policy file a caller owns or the callers' group may write is refused at start",
          "[security][policy][trusted-path]") {
  SoftHsmToken token;
  SharedDir dir;
  auto policy = dir.path / "policy.yaml";
  std::string expect;
  SECTION("owned by the app's uid") {
    write_file(policy, app_policy());
    REQUIRE(::chown(policy.c_str(), kApp.uid, kApp.gid) == 0);
    expect = policy.string() + " is owned by uid " + std::to_string(kApp.uid);
  }
  SECTION("writable by the callers' group") {
    write_file(policy, app_policy(), 0664);
    REQUIRE(::chown(policy.c_str(), 0, kSocketGroup) == 0);
    expect = policy.string() + " is writable by group " + std::to_string(kSocketGroup);
  }
  SECTION("in a directory the callers' group may write") {
    const auto conf = dir.path / "conf";
    make_dir(conf, 0, kSocketGroup, 0775);
    policy = conf / "policy.yaml";
    write_file(policy, app_policy());
    expect = conf.string() + " is writable by group " + std::to_string(kSocketGroup);
  }
  SECTION("in a directory the app's uid owns") {
    const auto conf = dir.path / "conf";
    make_dir(conf, kApp.uid, kApp.gid, 0755);
    policy = conf / "policy.yaml";
    write_file(policy, app_policy());
    expect = conf.string() + " is owned by uid " + std::to_string(kApp.uid);
  }
  auto args = base_args(token, dir.socket().string());
  args.insert(args.end(), {"--policy", policy.string()});
  const auto result = run_agent(args, token_env(token), 10s);
  INFO(result.err);
  CHECK(result.status.exited);
  CHECK(result.status.code == 2);
  CHECK(result.err.find("hsm-agent: " + policy.string() + ": ") != std::string::npos);
  CHECK(result.err.find(expect) != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir.socket()));
}

TEST_CASE("policy: at SIGHUP a policy file the app took over is refused and the old policy stays",
          "[security][policy][reload][trusted-path]") {
  AgentUnderAppPolicy env({"app-a", "admin-key"});
  auto& agent = env.agent;
  const auto& policy = env.policy;
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  REQUIRE(denied(app.call(sign_request("admin-key"))));

  // An operator's slip makes the file the app's; the app grants itself every key.
  REQUIRE(::chown(policy.c_str(), kApp.uid, kApp.gid) == 0);
  const std::string wrote = run_as(kApp, [&] {
    std::ofstream out(policy, std::ios::trunc);
    out << "rules:\n"
           "  - match: { uids: [10001, 0] }\n"
           "    methods: [\"*\"]\n"
           "    kids: [\"*\"]\n";
    out.close();
    return std::string(out ? "written" : "not written");
  });
  REQUIRE(wrote == "written");
  agent.signal(SIGHUP);  // a log rotation, say
  REQUIRE(wait_until(
      [&] { return agent.stderr_text().find("policy not reloaded") != std::string::npos; }));
  CHECK(agent.stderr_text().find(policy.string() + " is owned by uid " +
                                 std::to_string(kApp.uid)) != std::string::npos);
  CHECK(count_of(agent.stderr_text(), "access: policy file") == 1);
  CHECK(denied(app.call(sign_request("admin-key"))));
  CHECK(succeeded(app.call(sign_request("app-a"))));
}

TEST_CASE(
    "policy: SIGHUP with a FIFO or a directory at the policy path: the agent keeps answering and "
    "keeps the old policy",
    "[security][policy][reload]") {
  AgentUnderAppPolicy env({"app-a", "other-b"});
  auto& agent = env.agent;
  const auto& policy = env.policy;
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  REQUIRE(succeeded(app.call(sign_request("app-a"))));
  const auto hups = [&] { return count_of(agent.stderr_text(), "SIGHUP: reloading"); };
  const auto loads = [&] { return count_of(agent.stderr_text(), "access: policy file"); };

  std::filesystem::remove(policy);
  SECTION("a FIFO (opening it for reading would wait for a writer)") {
    REQUIRE(::mkfifo(policy.c_str(), 0644) == 0);
  }
  SECTION("a directory") {
    std::filesystem::create_directory(policy);
  }
  agent.signal(SIGHUP);
  REQUIRE(wait_until([&] { return hups() == 1; }));
  // The agent answers within 1 s, by the policy in force.
  CHECK(succeeded(app.call(sign_request("app-a"), 1s)));
  CHECK(denied(app.call(sign_request("other-b"), 1s)));
  CHECK(wait_until(
      [&] { return agent.stderr_text().find("policy not reloaded") != std::string::npos; }));
  CHECK(agent.stderr_text().find("not a regular file") != std::string::npos);
  CHECK(loads() == 1);

  // A good file again: the next SIGHUP loads it.
  std::filesystem::remove(policy);
  write_file(policy,
             "rules:\n"
             "  - match: { uids: [10001] }\n"
             "    methods: [sign]\n"
             "    kids: [\"other-*\"]\n");
  agent.signal(SIGHUP);
  REQUIRE(wait_until([&] { return loads() == 2; }));
  CHECK(succeeded(app.call(sign_request("other-b"), 1s)));
  CHECK(denied(app.call(sign_request("app-a"), 1s)));
  CHECK(agent.running());
}

TEST_CASE(
    "policy: a Kubernetes ConfigMap mount (read-only, 0777, ..data symlinks) is accepted and "
    "follows updates at SIGHUP",
    "[security][policy][reload][trusted-path]") {
  SoftHsmToken token;
  SharedDir dir;
  // What the kubelet makes on the node (its atomic writer): a 0777 directory holding a
  // timestamped directory with the files, "..data" pointing at it and each key pointing through
  // "..data"; then it bind-mounts that read-only into the container.
  const auto node = dir.path / "node-configmap";
  make_dir(node, 0, 0, 0777);
  const auto publish = [&](const std::string& version, const std::string& text) {
    const auto payload = node / ("..2024_" + version);
    make_dir(payload, 0, 0, 0755);
    write_file(payload / "policy.yaml", text);
    const auto staged = node / "..data_tmp";
    std::filesystem::create_directory_symlink(payload.filename(), staged);
    std::filesystem::rename(staged, node / "..data");
  };
  publish("01", app_policy());
  std::filesystem::create_symlink("..data/policy.yaml", node / "policy.yaml");

  // Not mounted: a directory everyone may write is refused, symlinks or not.
  {
    auto args = base_args(token, dir.socket().string());
    args.insert(args.end(), {"--policy", (node / "policy.yaml").string()});
    const auto result = run_agent(args, token_env(token), 10s);
    INFO(result.err);
    CHECK(result.status.code == 2);
    CHECK(result.err.find(node.string() + " is writable by others") != std::string::npos);
  }

  enter_private_mount_namespace();
  const auto mounted = dir.path / "etc-hsm-agent";
  make_dir(mounted, 0, 0, 0755);
  if (::mount(node.c_str(), mounted.c_str(), nullptr, MS_BIND, nullptr) != 0 ||
      ::mount(nullptr, mounted.c_str(), nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY, nullptr) != 0) {
    FAIL("cannot bind-mount read-only: " << std::strerror(errno));
  }
  AgentProcess agent(token, agent_options(dir, {"--policy", (mounted / "policy.yaml").string()}));
  {
    hsm::Client root(agent.socket_path());
    root.generate_key("app-a");
    root.generate_key("other-b");
  }
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  CHECK(succeeded(app.call(sign_request("app-a"))));
  CHECK(denied(app.call(sign_request("other-b"))));

  // The ConfigMap changes: the kubelet swaps "..data"; SIGHUP picks the new file up.
  publish("02",
          "rules:\n"
          "  - match: { uids: [10001] }\n"
          "    methods: [sign]\n"
          "    kids: [\"other-*\"]\n");
  agent.signal(SIGHUP);
  REQUIRE(wait_until([&] { return count_of(agent.stderr_text(), "access: policy file") == 2; }));
  CHECK(succeeded(app.call(sign_request("other-b"))));
  CHECK(denied(app.call(sign_request("app-a"))));
  agent.stop();
  ::umount2(mounted.c_str(), MNT_DETACH);
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

TEST_CASE(
    "rate limit: counts signatures, so a sign_batch takes a token per item or is refused whole",
    "[security][rate-limit]") {
  SoftHsmToken token;
  SharedDir dir;
  // A token every 10 s: none comes back while the test runs, however slow the machine.
  AgentProcess agent(token, agent_options(dir, {"--allow-uid", "10001", "--rate-limit", "0.1",
                                                "--rate-burst", "5"}));
  RawConnection admin(agent.socket_path());  // root: creates the key; root's own bucket
  REQUIRE(succeeded(admin.call(generate_request("app-batch"))));
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));

  const auto batch_of = [](std::size_t items) {
    protocol::SignBatchParams batch;
    for (std::size_t i = 0; i < items; ++i) {
      protocol::SignParams item;
      item.kid = "app-batch";
      item.input = hsm::protocol::Data{protocol::Bytes{static_cast<std::uint8_t>(i)}};
      batch.items.push_back(item);
    }
    return request(Method::kSignBatch, batch);
  };
  // The attack of issue 15: 256 signatures in one request, far past the burst of 5.
  const auto big = error_of(app.call(batch_of(256)));
  REQUIRE(big.has_value());
  CHECK(big->code == ErrorCode::kOverloaded);
  // Refused whole: it took nothing, so the whole burst is still there for five signatures...
  const auto five = app.call(batch_of(5));
  REQUIRE(succeeded(five));
  const auto& results =
      std::get<protocol::SignBatchResult>(std::get<protocol::Result>(five->body)).results;
  CHECK(results.size() == 5);
  // ...and they used it up: even one more signature, alone or in a batch, is over the rate.
  CHECK(error_of(app.call(batch_of(2)))->code == ErrorCode::kOverloaded);
  CHECK(error_of(app.call(sign_request("app-batch")))->code == ErrorCode::kOverloaded);
}

// ---- connection slots and memory: one caller cannot take what the others need ----------------

namespace {

// The policy of the deployment examples plus a caller (kStranger) allowed only capabilities.
std::string app_and_stranger_policy() {
  return app_policy() +
         "  - name: stranger-capabilities\n"
         "    match: { uids: [10002] }\n"
         "    methods: [capabilities]\n";
}

}  // namespace

TEST_CASE(
    "connections: another uid holding its whole share cannot stop the app connecting and "
    "signing",
    "[security][limits]") {
  SoftHsmToken token;
  SharedDir dir;
  write_file(dir.path / "policy.yaml", app_and_stranger_policy());
  AgentProcess agent(
      token, agent_options(dir, {"--policy", (dir.path / "policy.yaml").string(),
                                 "--max-connections", "8", "--max-connections-per-uid", "4"}));
  RawConnection admin(agent.socket_path());  // root's one connection
  REQUIRE(succeeded(admin.call(generate_request("app-slots"))));
  const auto spki = [&] {
    const auto answer =
        admin.call(request(Method::kGetPublicKey, protocol::KidParams{"app-slots"}));
    REQUIRE(succeeded(answer));
    return std::get<protocol::PublicKeyResult>(std::get<protocol::Result>(answer->body)).spki;
  }();

  // The stranger tries to take every slot, trickling a byte now and then to look busy.
  std::vector<RawConnection> held;
  int refused = 0;
  for (int i = 0; i < 8; ++i) {
    auto connection = RawConnection::adopt(connect_as(kStranger, agent.socket_path()));
    (void)connection.send(std::string_view("\x94", 1));
    held.push_back(std::move(connection));
  }
  for (auto& connection : held) refused += connection.closed_by_peer(2s) ? 1 : 0;
  CHECK(refused == 4);  // its share is 4 of the 8

  // The app still gets a slot, and signs.
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  const auto answer = app.call(sign_request("app-slots", "through the stranger's flood"));
  REQUIRE(succeeded(answer));
  const auto& signature =
      std::get<protocol::SignResult>(std::get<protocol::Result>(answer->body)).signature;
  CHECK(verify_with_spki(spki, "ES256", to_bytes("through the stranger's flood"), signature));
  const auto [status, text] = agent.http_get("/metrics");
  REQUIRE(status == 200);
  CHECK(metric_sample(
            text, R"(hsm_agent_connections_rejected_total{reason="max_connections_per_uid"})") ==
        4);
  CHECK(agent.stderr_text().find("connection refused (max_connections_per_uid)") !=
        std::string::npos);
}

TEST_CASE(
    "memory: 250 connections each holding an incomplete 1 MiB message stay within the "
    "budget, the app keeps signing, and RSS comes back when they leave",
    "[security][memory]") {
  constexpr std::size_t kConnections = 250;
  constexpr std::size_t kMiB = 1024 * 1024;
  constexpr std::size_t kBudget = 64 * kMiB;  // the default --max-buffered-bytes
  SoftHsmToken token;
  SharedDir dir;
  write_file(dir.path / "policy.yaml", app_and_stranger_policy());
  // The read timeout is longer than the test: the attackers leave when the test says so.
  AgentProcess agent(token, agent_options(dir, {"--policy", (dir.path / "policy.yaml").string(),
                                                "--read-timeout", "120"}));
  RawConnection admin(agent.socket_path());
  REQUIRE(succeeded(admin.call(generate_request("app-memory"))));
  auto app = RawConnection::adopt(connect_as(kApp, agent.socket_path()));
  REQUIRE(succeeded(app.call(sign_request("app-memory", "before"))));
  const std::size_t rss_start = resident_kib(agent.pid());

  // Each: the start of a sign whose data is a bin32 of 1 MiB - 256 bytes, never finished.
  constexpr char kHead[] =
      "\x94\x00\x01\xa4"
      "sign\x82\xa3"
      "kid\xa4"
      "x-kk\xa4"
      "data\xc6";
  std::string head(kHead, sizeof(kHead) - 1);  // the literal holds a NUL byte
  const std::uint32_t length = kMiB - 256;
  for (int shift = 24; shift >= 0; shift -= 8) head.push_back(static_cast<char>(length >> shift));
  const std::string body(64 * 1024, 'z');
  std::vector<RawConnection> attackers;
  std::vector<std::size_t> sent(kConnections, 0);
  for (std::size_t i = 0; i < kConnections; ++i) {
    attackers.push_back(RawConnection::adopt(connect_as(kStranger, agent.socket_path())));
    REQUIRE(attackers.back().send(head));
  }
  // Push as much as the agent takes (non-blocking), round after round, until it takes no more.
  std::size_t peak_rss = 0, app_signed = 0, app_tries = 0;
  for (int round = 0; round < 200; ++round) {
    std::size_t progress = 0;
    for (std::size_t i = 0; i < kConnections; ++i) {
      while (sent[i] + body.size() < length) {
        const ssize_t n =
            ::send(attackers[i].fd(), body.data(), body.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n <= 0) break;
        sent[i] += static_cast<std::size_t>(n);
        progress += static_cast<std::size_t>(n);
      }
    }
    peak_rss = std::max(peak_rss, resident_kib(agent.pid()));
    if (round % 10 == 0) {
      ++app_tries;
      app_signed += succeeded(app.call(sign_request("app-memory", "during"))) ? 1U : 0U;
    }
    if (progress == 0 && round > 20) break;
    std::this_thread::sleep_for(20ms);
  }
  CHECK(app_signed == app_tries);
  const auto [status, text] = agent.http_get("/metrics");
  REQUIRE(status == 200);
  // What the agent holds, by its own count: the budget plus a light allowance per connection.
  const double held = metric_sample(text, "hsm_agent_buffered_bytes");
  CHECK(held <= static_cast<double>(kBudget + (kConnections + 2) * 24 * 1024));
  CHECK(metric_sample(text, "hsm_agent_memory_budget_waits_total") >= 1);
  peak_rss = std::max(peak_rss, resident_kib(agent.pid()));
  WARN("agent VmRSS " << rss_start << " KiB at start, " << peak_rss << " KiB at the peak, "
                      << held / kMiB << " MiB held by the budget's count");
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // docs/reliability.md, "Memory": at most twice what the budget admits, over the start.
  CHECK(peak_rss <= rss_start + 2 * (kBudget + kConnections * 24 * 1024) / 1024);
#endif

  attackers.clear();
  CHECK(succeeded(app.call(sign_request("app-memory", "after"))));
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  std::size_t rss_after = 0;
  CHECK(wait_until(
      [&] {
        rss_after = resident_kib(agent.pid());
        return rss_after <= rss_start + 20 * 1024;
      },
      10s));
  WARN("agent VmRSS after the attackers left: " << rss_after << " KiB");
#endif
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
