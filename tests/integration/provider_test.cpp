// hsm-provider (client/provider, docs/openssl-provider.md) driven the way applications use it:
// the stock `openssl` command line and a small C++ program, with the provider loaded from an
// openssl.cnf or by -provider, against the real agent on a SoftHSMv2 token. Every signature is
// checked by stock OpenSSL (no provider loaded) with the public key the agent returned.
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <array>
#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <hsm/client.hpp>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "fixtures/agent_process.hpp"
#include "fixtures/polling.hpp"
#include "fixtures/softhsm_token.hpp"

extern char** environ;

namespace {

using hsm::test::AgentOptions;
using hsm::test::AgentProcess;
using hsm::test::SoftHsmToken;
using hsm::test::wait_until;
namespace fs = std::filesystem;

// ---- files and commands ------------------------------------------------------------------

/// A temporary directory every uid may read (the TLS server runs as another uid), removed at
/// the end.
struct WorkDir {
  WorkDir() : path(hsm::test::make_temp_dir("hsm-provider")) {
    fs::permissions(path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
  }
  ~WorkDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  [[nodiscard]] std::string operator/(const std::string& name) const {
    return (path / name).string();
  }
  fs::path path;
};

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Output {
  int status = -1;
  std::string text;  // stdout and stderr
};

/// Runs a shell command line to completion; its exit status and output.
Output sh(const std::string& command) {
  Output out;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buffer{};
  while (const auto n = std::fread(buffer.data(), 1, buffer.size(), pipe)) {
    out.text.append(buffer.data(), n);
  }
  const int status = ::pclose(pipe);
  out.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

/// A command that must succeed (its output in the failure message otherwise).
std::string ok(const std::string& command) {
  const auto out = sh(command);
  INFO(command << "\n" << out.text);
  REQUIRE(out.status == 0);
  return out.text;
}

/// A process in the background, its output in a file. Killed on destruction if still running.
class Background {
 public:
  Background(const std::string& command, std::string output) : output_(std::move(output)) {
    const std::string line = "exec " + command + " >" + output_ + " 2>&1";
    const char* argv[] = {"/bin/sh", "-c", line.c_str(), nullptr};
    REQUIRE(::posix_spawn(&pid_, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ) ==
            0);
  }
  ~Background() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  [[nodiscard]] std::string output() const { return read_file(output_); }
  void signal(int signum) const { ::kill(pid_, signum); }
  /// Waits (bounded) for the process to exit; its exit status, or -1.
  int wait() {
    int status = 0;
    const bool ended = wait_until([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; });
    if (!ended) return -1;
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  std::string output_;
  pid_t pid_ = -1;
};

std::size_t count_of(const std::string& text, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// ---- the provider's setting ----------------------------------------------------------------

#ifdef HSM_PROVIDER_PRELOAD
// An AddressSanitizer build: its runtime must come first in a process that loads hsm.so.
const std::string kPreload = "LD_PRELOAD=" HSM_PROVIDER_PRELOAD " ";
#else
const std::string kPreload;
#endif

/// Stock OpenSSL: no configuration file, so the default provider alone.
const std::string kStock = "env OPENSSL_CONF=/dev/null openssl";

/// An openssl.cnf that loads the default provider, then hsm (the order docs/openssl-provider.md
/// asks for) with this socket and timeout. Returns the command prefix that uses it.
std::string provider_config(const WorkDir& dir, const std::string& socket, int timeout_ms = 5000) {
  // A copy of hsm.so next to the configuration: readable by the TLS server's uid too.
  const auto module = dir / "hsm.so";
  fs::copy_file(HSM_PROVIDER_MODULE, module, fs::copy_options::overwrite_existing);
  const auto conf = dir / "openssl.cnf";
  write_file(conf,
             "openssl_conf = openssl_init\n"
             "[openssl_init]\nproviders = provider_sect\n"
             "[provider_sect]\ndefault = default_sect\nhsm = hsm_sect\n"
             "[default_sect]\nactivate = 1\n"
             "[hsm_sect]\nmodule = " +
                 module + "\nsocket = " + socket + "\ntimeout_ms = " + std::to_string(timeout_ms) +
                 "\nactivate = 1\n");
  return "env " + kPreload + "OPENSSL_CONF=" + conf + " openssl";
}

/// The agent's public key of `kid` as a PEM file (from the client, not from the provider).
std::string public_pem(hsm::Client& client, const WorkDir& dir, const std::string& kid) {
  const auto spki = client.get_public_key(kid).spki;
  const unsigned char* at = spki.data();
  EVP_PKEY* key = d2i_PUBKEY(nullptr, &at, static_cast<long>(spki.size()));
  REQUIRE(key != nullptr);
  const auto path = dir / (kid + ".pub.pem");
  FILE* file = std::fopen(path.c_str(), "w");
  REQUIRE(file != nullptr);
  const int written = PEM_write_PUBKEY(file, key);
  std::fclose(file);
  EVP_PKEY_free(key);
  REQUIRE(written == 1);
  return path;
}

/// Writes the `md` hash of `data` to `path` (what pkeyutl signs).
void write_digest(const std::string& md, const std::string& data, const std::string& path) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  REQUIRE(EVP_Digest(data.data(), data.size(), digest, &size, EVP_get_digestbyname(md.c_str()),
                     nullptr) == 1);
  write_file(path, std::string(reinterpret_cast<const char*>(digest), size));
}

struct KeyCase {
  std::string alg;
  std::string md;       // for dgst / req
  std::string sigopts;  // dgst/req -sigopt, pkeyutl -pkeyopt (without the prefix)
  bool certificate;     // req -x509 with this key (else a CSR; each openssl run costs time)
};

// One key per alg family the provider handles.
const std::vector<KeyCase> kKeys = {
    {"ES256", "sha256", "", true},
    {"ES384", "sha384", "", false},
    {"ES512", "sha512", "", true},
    {"RS256", "sha256", "", false},
    {"PS256", "sha256", "rsa_padding_mode:pss rsa_pss_saltlen:digest", true},
    {"EdDSA", "", "", false},
};

std::string flags(const std::string& flag, const std::string& list) {
  std::string out;
  std::istringstream in(list);
  for (std::string item; in >> item;) out += " " + flag + " " + item;
  return out;
}

AgentOptions quiet_agent(std::vector<std::string> args = {}) {
  AgentOptions options;
  options.extra_args = std::move(args);
  options.metrics = false;
  return options;
}

/// A token, an agent on it, a client and an openssl.cnf loading the provider for that agent.
struct ProviderSetting {
  explicit ProviderSetting(int timeout_ms = 5000)
      : agent(token, quiet_agent()),
        client(agent.socket_path()),
        openssl(provider_config(dir, agent.socket_path(), timeout_ms)) {}

  SoftHsmToken token;
  AgentProcess agent;
  hsm::Client client;
  WorkDir dir;
  std::string openssl;  // the openssl command with the provider's configuration
};

}  // namespace

TEST_CASE("provider: openssl pkey, dgst, pkeyutl and req sign with hsm:<kid> for every key type",
          "[provider]") {
  // A short client timeout: the unreachable socket below fails after it (its retries end there).
  ProviderSetting setting(1000);
  auto& [token, agent, client, dir, openssl] = setting;
  write_file(dir / "message", "signed through hsm-provider\n");
  const auto message = dir / "message";

  // The keys, one after the other: six C_GenerateKeyPair at once on SoftHSMv2 failed once with
  // CKR_GENERAL_ERROR in a CI AddressSanitizer run (SoftHSMv2's, not the agent's; see the issue
  // 20 note), and concurrent key generation is not what this test is about.
  for (const auto& key : kKeys) (void)client.generate_key("cli-" + key.alg, key.alg);

  for (const auto& key : kKeys) {
    const std::string kid = "cli-" + key.alg;
    const auto pub = public_pem(client, dir, kid);
    const auto uri = "hsm:" + kid;
    INFO(kid);

    // The provider's public key is the agent's.
    ok(openssl + " pkey -in " + uri + " -pubout -out " + (dir / (kid + ".provider.pem")));
    CHECK(read_file(dir / (kid + ".provider.pem")) == read_file(pub));

    const auto sig = dir / (kid + ".sig");
    if (key.alg == "EdDSA") {
      // Ed25519 signs the message itself (OpenSSL 3.0's dgst cannot sign with Ed25519 keys at
      // all, stock ones included): pkeyutl -rawin is the command line's one-shot.
      ok(openssl + " pkeyutl -sign -inkey " + uri + " -rawin -in " + message + " -out " + sig);
      ok(kStock + " pkeyutl -verify -pubin -inkey " + pub + " -rawin -in " + message +
         " -sigfile " + sig);
    } else {
      // dgst: digest-sign (hashed by the provider, the digest signed by the agent).
      ok(openssl + " dgst -" + key.md + " -sign " + uri + flags("-sigopt", key.sigopts) + " -out " +
         sig + " " + message);
      CHECK(ok(kStock + " dgst -" + key.md + " -verify " + pub + flags("-sigopt", key.sigopts) +
               " -signature " + sig + " " + message)
                .find("Verified OK") != std::string::npos);
      // pkeyutl: a digest computed elsewhere, signed as is.
      const auto digest = dir / (kid + ".digest");
      write_digest(key.md, read_file(message), digest);
      const auto pkeyopts = flags("-pkeyopt", "digest:" + key.md + " " + key.sigopts);
      ok(openssl + " pkeyutl -sign -inkey " + uri + pkeyopts + " -in " + digest + " -out " + sig);
      ok(kStock + " pkeyutl -verify -pubin -inkey " + pub + pkeyopts + " -in " + digest +
         " -sigfile " + sig);
    }

    // A self-signed certificate or a CSR, signed by the agent, verified by stock OpenSSL.
    const auto md = key.md.empty() ? std::string{} : " -" + key.md;
    const auto sigopts = flags("-sigopt", key.sigopts);
    if (key.certificate) {
      const auto cert = dir / (kid + ".crt");
      ok(openssl + " req -new -x509 -key " + uri + md + sigopts + " -subj /CN=" + kid +
         " -days 1 -out " + cert);
      CHECK(ok(kStock + " verify -CAfile " + cert + " " + cert).find(": OK") != std::string::npos);
    } else {
      const auto csr = dir / (kid + ".csr");
      ok(openssl + " req -new -key " + uri + md + sigopts + " -subj /CN=" + kid + " -out " + csr);
      CHECK(ok(kStock + " req -verify -in " + csr + " -noout").find("verify OK") !=
            std::string::npos);
    }
  }
  // Every signature above went through the agent: sign requests audited for each key.
  for (const auto& key : kKeys) {
    CHECK(wait_until([&] {
      return agent.stdout_text().find(R"("method":"sign","kid":"cli-)" + key.alg) !=
             std::string::npos;
    }));
  }

  // ?socket= names the agent in the URI itself (here the same one as the configuration's).
  CHECK(ok(openssl + " pkey -in 'hsm:cli-ES256?socket=" + agent.socket_path() + "' -pubout") ==
        read_file(dir / "cli-ES256.pub.pem"));

  // -provider hsm -provider default on the command line, no configuration file.
  const auto with_providers = [&](const std::string& command, const std::string& args) {
    return "env " + kPreload + "OPENSSL_CONF=/dev/null OPENSSL_MODULES=" +
           fs::path(HSM_PROVIDER_MODULE).parent_path().string() +
           " HSM_AGENT_SOCKET=" + agent.socket_path() + " openssl " + command +
           " -provider hsm -provider default " + args;
  };
  CHECK(ok(with_providers("pkey", "-in hsm:cli-ES256 -pubout")) ==
        read_file(dir / "cli-ES256.pub.pem"));
  ok(with_providers("dgst",
                    "-sha256 -sign hsm:cli-ES256 -out " + (dir / "cli.sig") + " " + message));
  ok(kStock + " dgst -sha256 -verify " + (dir / "cli-ES256.pub.pem") + " -signature " +
     (dir / "cli.sig") + " " + message);

  // Errors name the kid, the socket, the agent's code.
  {
    const auto unknown = sh(openssl + " pkey -in hsm:no-such-key -pubout");
    INFO(unknown.text);
    CHECK(unknown.status != 0);
    CHECK(unknown.text.find("no key 'hsm:no-such-key' on hsm-agent at " + agent.socket_path() +
                            ": not_found") != std::string::npos);

    const auto elsewhere = dir / "nobody.sock";
    const auto unreachable =
        sh(openssl + " pkey -in 'hsm:cli-ES256?socket=" + elsewhere + "' -pubout");
    INFO(unreachable.text);
    CHECK(unreachable.status != 0);
    CHECK(unreachable.text.find("no answer from hsm-agent at " + elsewhere) != std::string::npos);

    const auto bad_uri = sh(openssl + " pkey -in 'hsm:?socket=/x' -pubout");
    CHECK(bad_uri.status != 0);
    CHECK(bad_uri.text.find("is not an hsm key URI") != std::string::npos);

    // The agent's refusal, with its code and message: a PS256 key asked for PKCS#1 v1.5.
    const auto refused = sh(openssl + " dgst -sha256 -sign hsm:cli-PS256 -out " +
                            (dir / "refused.sig") + " " + message);
    INFO(refused.text);
    CHECK(refused.status != 0);
    CHECK(refused.text.find("signing with 'hsm:cli-PS256' as RS256: hsm-agent at " +
                            agent.socket_path() + " answered unsupported_alg") !=
          std::string::npos);

    // No private key material comes out: writing the private key fails, and prints no key.
    const auto exported = sh(openssl + " pkey -in hsm:cli-ES256");
    CHECK(exported.status != 0);
    CHECK(exported.text.find("PRIVATE KEY") == std::string::npos);
  }
}

TEST_CASE(
    "provider: s_server -key hsm:<kid> completes TLS 1.3 and 1.2 handshakes, audited "
    "under the server's uid",
    "[provider]") {
  // The server runs as uid 10001 (a member of the socket's group), admitted by --allow-uid: the
  // audit log must show its uid on the handshake signatures.
  constexpr int kServerUid = 10001;
  constexpr int kSocketGroup = 10000;
  SoftHsmToken token;
  WorkDir dir;
  auto options = quiet_agent(
      {"--allow-uid", std::to_string(kServerUid), "--socket-group", std::to_string(kSocketGroup)});
  options.socket = dir.path / "agent.sock";
  AgentProcess agent(token, options);
  hsm::Client client(agent.socket_path());
  const auto openssl = provider_config(dir, agent.socket_path());
  const std::string as_server = "setpriv --reuid=" + std::to_string(kServerUid) +
                                " --regid=" + std::to_string(kServerUid) +
                                " --groups=" + std::to_string(kSocketGroup) + " ";

  struct TlsCase {
    std::string alg;
    std::string sigopts;
    std::string signature_type;  // as s_client -brief reports it
  };
  for (const TlsCase& c :
       {TlsCase{"ES256", "", "ECDSA"},
        TlsCase{"PS256", "rsa_padding_mode:pss rsa_pss_saltlen:digest", "RSA-PSS"}}) {
    const std::string kid = "tls-" + c.alg;
    INFO(kid);
    client.generate_key(kid, c.alg);
    const auto cert = dir / (kid + ".crt");
    ok(openssl + " req -new -x509 -key hsm:" + kid + flags("-sigopt", c.sigopts) +
       " -subj /CN=localhost -days 1 -out " + cert);

    const int port = hsm::test::free_tcp_port();
    Background server(as_server + openssl + " s_server -accept 127.0.0.1:" + std::to_string(port) +
                          " -key hsm:" + kid + " -cert " + cert + " -naccept 2 -www",
                      dir / (kid + ".server.out"));
    REQUIRE(wait_until([&] { return server.output().find("ACCEPT") != std::string::npos; }));
    for (const std::string version : {"-tls1_3", "-tls1_2"}) {
      const auto client_run =
          sh(kStock + " s_client -connect 127.0.0.1:" + std::to_string(port) + " " + version +
             " -CAfile " + cert + " -verify_return_error -brief </dev/null");
      INFO("s_client: " << client_run.text << "\ns_server: " << server.output());
      REQUIRE(client_run.status == 0);
      const auto& hello = client_run.text;
      CHECK(hello.find(version == "-tls1_3" ? "Protocol version: TLSv1.3"
                                            : "Protocol version: TLSv1.2") != std::string::npos);
      CHECK(hello.find("Verification: OK") != std::string::npos);
      CHECK(hello.find("Signature type: " + c.signature_type) != std::string::npos);
    }
    CHECK(server.wait() == 0);
    // Two handshakes, two signatures by the server's uid with its key.
    CHECK(wait_until([&] {
      const auto audit = agent.stdout_text();
      std::size_t n = 0;
      std::istringstream lines(audit);
      for (std::string line; std::getline(lines, line);) {
        if (line.find(R"("method":"sign","kid":")" + kid + "\"") != std::string::npos &&
            line.find(R"("result":"ok")") != std::string::npos &&
            line.find("\"uid\":" + std::to_string(kServerUid) + ",") != std::string::npos) {
          ++n;
        }
      }
      return n == 2;
    }));
  }
}

TEST_CASE("provider: a C++ program loads hsm:<kid> through OSSL_STORE, signs from 8 threads, forks",
          "[provider]") {
  ProviderSetting setting;
  auto& [token, agent, client, dir, openssl] = setting;
  const std::string conf = "env OPENSSL_CONF=" + (dir / "openssl.cnf") + " ";
  for (const auto& [alg, flags] :
       std::map<std::string, std::string>{{"ES256", ""}, {"PS256", " --pss"}, {"EdDSA", ""}}) {
    const auto kid = "threads-" + alg;
    client.generate_key(kid, alg);
    const auto out =
        ok(conf + HSM_PROVIDER_STORE_SIGN + " hsm:" + kid + " --threads 8 --count 16" + flags);
    CHECK(out.find("signed 128, failed 0") != std::string::npos);
  }

#if defined(__SANITIZE_ADDRESS__)
  // Under AddressSanitizer the fork below hung once in CI, with the machine loaded: a child
  // forked from a process with running threads (the client's reader and timer) that allocate,
  // under GCC 12's libasan, is the suspect. The fork is tested in the other builds.
  SUCCEED("fork not tested under AddressSanitizer");
  return;
#endif
  // A process that forks after it signed (a server's master and its workers): the child opens
  // its own connection (another peer pid in the audit log) and both go on signing.
  const auto out =
      ok(conf + HSM_PROVIDER_STORE_SIGN + " hsm:threads-ES256 --fork --threads 4" + " --count 8");
  CHECK(count_of(out, "signed 32, failed 0") == 2);
  CHECK(out.find("child: signed 32, failed 0") != std::string::npos);
  CHECK(wait_until([&] {
    std::set<std::string> pids;
    std::istringstream lines(agent.stdout_text());
    for (std::string line; std::getline(lines, line);) {
      const auto at = line.find(R"("pid":)");
      if (line.find(R"("method":"sign","kid":"threads-ES256")") != std::string::npos &&
          at != std::string::npos) {
        pids.insert(line.substr(at, line.find(',', at) - at));
      }
    }
    return pids.size() == 3;  // the 8-thread run, the forking parent, its child
  }));
}

TEST_CASE(
    "provider: an agent stopped mid-run gives errors, not hangs, and works again after "
    "restart",
    "[provider]") {
  SoftHsmToken token;
  WorkDir dir;
  auto options = quiet_agent();
  options.socket = dir.path / "agent.sock";
  auto agent = std::make_unique<AgentProcess>(token, options);
  {
    hsm::Client client(agent->socket_path());
    client.generate_key("restart-key", "ES256");
  }
  // A short client timeout, so that each failed signature returns within a second.
  const auto openssl = provider_config(dir, agent->socket_path(), 1000);
  Background signer("env OPENSSL_CONF=" + (dir / "openssl.cnf") + " " + HSM_PROVIDER_STORE_SIGN +
                        " hsm:restart-key --threads 4 --seconds 120",
                    dir / "signer.out");
  // It signs (a failure would print a line at once) ...
  REQUIRE(wait_until([&] {
    return agent->stdout_text().find("restart-key") != std::string::npos &&
           count_of(agent->stdout_text(), R"("method":"sign")") >= 8;
  }));
  CHECK(signer.output().empty());
  // ... every thread gets an error naming the socket once the agent is gone ...
  CHECK(agent->stop().exited);
  agent.reset();
  REQUIRE(wait_until([&] { return count_of(signer.output(), ": error: ") == 4; }));
  CHECK(count_of(signer.output(), "no answer from hsm-agent at " + options.socket->string()) == 4);
  // ... and signs again once an agent is back on the socket.
  agent = std::make_unique<AgentProcess>(token, options);
  REQUIRE(wait_until([&] { return count_of(signer.output(), ": ok") == 4; }));
  signer.signal(SIGTERM);
  CHECK(signer.wait() == 0);
  CHECK(signer.output().find("signed ") != std::string::npos);
}
