#include "service_fixture.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>

extern char** environ;  // NOLINT: POSIX

namespace hsm::agent::test {

HsmConfig config_for(const hsm::test::SoftHsmToken& token, const ServiceOptions& options) {
  HsmConfig config;
  config.module_path = options.module;
  config.token_label = token.label();
  config.pin = SecretString(token.user_pin());
  config.read_only = options.read_only;
  config.sessions = options.sessions;
  config.max_sessions = options.max_sessions != 0 ? options.max_sessions : options.sessions;
  config.object_changes = options.object_changes;
  return config;
}

OpenService::OpenService(const hsm::test::SoftHsmToken& token, const ServiceOptions& options)
    : state_(TokenState::open(config_for(token, options), metrics_)),
      service_(std::make_unique<KeyService>(state_, metrics_)) {}

OpenService::~OpenService() {
  if (service_) service_->close();
}

Outcome OpenService::call(protocol::Method method, protocol::Params params) {
  protocol::Request request;
  request.msgid = 1;
  request.method = method;
  request.params = std::move(params);
  return service_->execute(request, std::chrono::steady_clock::now() + std::chrono::seconds(5));
}

protocol::Error OpenService::error(protocol::Method method, protocol::Params params) {
  Outcome outcome = call(method, std::move(params));
  const auto* error = std::get_if<protocol::Error>(&outcome);
  REQUIRE(error != nullptr);
  return *error;
}

protocol::KeyDescription OpenService::generate(const std::string& kid, const std::string& alg) {
  return ok<protocol::KeyDescription>(protocol::Method::kGenerateKey,
                                      protocol::GenerateKeyParams{kid, alg, std::nullopt});
}

Bytes OpenService::sign_data(const std::string& kid, const Bytes& data,
                             std::optional<std::string> alg) {
  protocol::SignParams params{kid, protocol::Data{data}, std::move(alg), std::nullopt};
  return ok<protocol::SignResult>(protocol::Method::kSign, params).signature;
}

bool OpenService::verify_data(const std::string& kid, const Bytes& data, const Bytes& signature,
                              std::optional<std::string> alg) {
  protocol::VerifyParams params{kid, protocol::Data{data}, signature, std::move(alg), std::nullopt};
  return ok<protocol::VerifyResult>(protocol::Method::kVerify, params).valid;
}

protocol::PublicKeyResult OpenService::public_key(const std::string& kid) {
  return ok<protocol::PublicKeyResult>(protocol::Method::kGetPublicKey, protocol::KidParams{kid});
}

int run_pkcs11_tool(const std::vector<std::string>& args, std::string& output) {
  char log_template[] = "/tmp/hsm-pkcs11-tool-XXXXXX";
  const int log_fd = ::mkstemp(log_template);
  if (log_fd < 0) throw std::system_error(errno, std::generic_category(), "mkstemp");
  ::close(log_fd);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_template, O_WRONLY | O_TRUNC, 0);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<std::string> full = {"pkcs11-tool", "--module", hsm::test::kSoftHsmModule};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& arg : full) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::system_error(rc, std::generic_category(), "posix_spawnp pkcs11-tool");
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::system_error(errno, std::generic_category(), "waitpid");
  }
  std::ifstream in(log_template);
  std::ostringstream text;
  text << in.rdbuf();
  output = text.str();
  ::unlink(log_template);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

Bytes bytes_of(std::string_view text) {
  return Bytes(text.begin(), text.end());
}

}  // namespace hsm::agent::test
