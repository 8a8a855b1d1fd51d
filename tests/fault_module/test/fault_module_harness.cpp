#include "fault_module_harness.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>

extern char** environ;

namespace hsm::fault::test {
namespace {

constexpr const char* kSoftHsmModule = "/usr/lib/softhsm/libsofthsm2.so";

std::string errno_text(int error) {
  return std::generic_category().message(error);
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error(what);
}

void set_environment(const std::string& name, const std::string& value) {
  if (value.empty()) {
    ::unsetenv(name.c_str());  // NOLINT(concurrency-mt-unsafe): the test thread, before any others
  } else if (::setenv(name.c_str(), value.c_str(), 1) != 0) {  // NOLINT(concurrency-mt-unsafe)
    fail("setenv " + name + ": " + errno_text(errno));
  }
}

/// Runs a program (looked up in PATH) with stdout discarded; throws unless it exits 0.
void run(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& arg : argv) {
    args.push_back(const_cast<char*>(arg.c_str()));
  }
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  // No terminal to prompt on (a missing argument must fail, not hang), and no chatter.
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int error = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    fail("cannot run " + argv[0] + ": " + errno_text(error));
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      fail("waitpid " + argv[0] + ": " + errno_text(errno));
    }
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fail(argv[0] + " failed");
  }
}

CK_FUNCTION_LIST* open_module(const std::string& path, void** handle) {
  *handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (*handle == nullptr) {
    fail("dlopen " + path + ": " + ::dlerror());  // NOLINT(concurrency-mt-unsafe)
  }
  auto* get_function_list =
      reinterpret_cast<CK_C_GetFunctionList>(::dlsym(*handle, "C_GetFunctionList"));
  if (get_function_list == nullptr) {
    fail(path + " has no C_GetFunctionList");
  }
  CK_FUNCTION_LIST* functions = nullptr;
  if (get_function_list(&functions) != CKR_OK || functions == nullptr) {
    fail(path + ": C_GetFunctionList failed");
  }
  return functions;
}

// The digest sign_once() signs: any 32 bytes will do for CKM_ECDSA on P-256.
std::array<unsigned char, 32> test_digest() {
  std::array<unsigned char, 32> digest{};
  digest.fill(0x5a);
  return digest;
}

}  // namespace

Harness& Harness::instance() {
  static Harness harness;
  return harness;
}

Harness::Harness() {
  std::string pattern = (std::filesystem::temp_directory_path() / "hsm-fault-test-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    fail("mkdtemp: " + errno_text(errno));
  }
  dir_ = pattern;
  control_ = dir_ / "faults.conf";
  stats_ = dir_ / "stats.txt";
  std::filesystem::create_directory(dir_ / "tokens");
  const std::filesystem::path config = dir_ / "softhsm2.conf";
  {
    std::ofstream out(config);
    out << "directories.tokendir = " << (dir_ / "tokens").string() << "\n"
        << "objectstore.backend = file\n"
        << "log.level = ERROR\n";
    if (!out) {
      fail("cannot write " + config.string());
    }
  }
  set_environment("SOFTHSM2_CONF", config.string());
  set_environment("HSM_FAULT_TARGET", kSoftHsmModule);
  set_environment("HSM_FAULT_CONTROL", control_.string());
  set_environment("HSM_FAULT_STATS", stats_.string());
  set_environment("HSM_FAULT_POLL_US", "0");
  run({"softhsm2-util", "--init-token", "--free", "--label", std::string(kTokenLabel), "--pin",
       std::string(kUserPin), "--so-pin", std::string(kSoPin)});
  functions_ = open_module(HSM_FAULT_MODULE_PATH, &library_);
}

Harness::~Harness() {
  // The module stays loaded (-z nodelete); only the files go. Its stats thread writes within
  // ~25 ms of the last call; let that happen first, or the write races the removal.
  std::this_thread::sleep_for(std::chrono::milliseconds(75));
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

void Harness::write_rules(std::string_view text) const {
  const std::filesystem::path temporary = control_.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << text;
    if (!out) {
      fail("cannot write " + temporary.string());
    }
  }
  std::filesystem::rename(temporary, control_);
}

void Harness::remove_rules() const {
  std::error_code ignored;
  std::filesystem::remove(control_, ignored);
}

std::map<std::string, std::uint64_t> Harness::read_stats() const {
  std::map<std::string, std::uint64_t> stats;
  std::ifstream in(stats_);
  std::string name;
  std::uint64_t value = 0;
  while (in >> name >> value) {
    stats[name] = value;
  }
  return stats;
}

std::uint64_t Harness::stat(const std::string& key) const {
  const auto stats = read_stats();
  const auto it = stats.find(key);
  return it == stats.end() ? 0 : it->second;
}

std::uint64_t Harness::wait_for_stat(const std::string& key, std::uint64_t at_least,
                                     std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::uint64_t value = stat(key);
  while (value < at_least && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    value = stat(key);
  }
  return value;
}

std::filesystem::path Harness::copy_module() {
  std::filesystem::path copy = dir_ / ("module-copy-" + std::to_string(++copies_) + ".so");
  std::filesystem::copy_file(HSM_FAULT_MODULE_PATH, copy);
  return copy;
}

CK_FUNCTION_LIST* Harness::load_module(const std::filesystem::path& module,
                                       const std::map<std::string, std::string>& environment) {
  std::map<std::string, std::optional<std::string>> saved;
  for (const auto& [name, value] : environment) {
    const char* old = std::getenv(name.c_str());  // NOLINT(concurrency-mt-unsafe)
    saved[name] = old != nullptr ? std::optional<std::string>(old) : std::nullopt;
    set_environment(name, value);
  }
  const auto restore = [&saved] {
    for (const auto& [name, value] : saved) {
      set_environment(name, value.value_or(""));
    }
  };
  void* handle = nullptr;
  CK_FUNCTION_LIST* functions = nullptr;
  try {
    functions = open_module(module.string(), &handle);  // the module reads its environment now
  } catch (...) {
    restore();
    throw;
  }
  restore();
  return functions;
}

TokenConnection::TokenConnection() : p11_(&Harness::instance().p11()) {
  Harness::instance().remove_rules();
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  if (const CK_RV rv = p11_->C_Initialize(&args); rv != CKR_OK) {
    fail("C_Initialize: " + std::to_string(rv));
  }
  CK_ULONG count = 0;
  if (p11_->C_GetSlotList(CK_TRUE, nullptr, &count) != CKR_OK) {
    fail("C_GetSlotList");
  }
  std::vector<CK_SLOT_ID> slots(count);
  if (p11_->C_GetSlotList(CK_TRUE, slots.data(), &count) != CKR_OK) {
    fail("C_GetSlotList");
  }
  slots.resize(count);
  for (const CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (p11_->C_GetTokenInfo(slot, &info) != CKR_OK) {
      continue;
    }
    std::string label(reinterpret_cast<const char*>(info.label), sizeof(info.label));
    label.erase(label.find_last_not_of(' ') + 1);
    if (label == kTokenLabel) {
      slot_ = slot;
      return;
    }
  }
  p11_->C_Finalize(nullptr);
  fail("no token labelled fault-test");
}

TokenConnection::~TokenConnection() {
  Harness::instance().remove_rules();
  if (!finalized_) {
    static_cast<void>(p11_->C_Finalize(nullptr));
  }
}

CK_RV TokenConnection::finalize() {
  finalized_ = true;
  return p11_->C_Finalize(nullptr);
}

CK_SESSION_HANDLE TokenConnection::open_session() const {
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  const CK_RV rv =
      p11_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session);
  if (rv != CKR_OK) {
    fail("C_OpenSession: " + std::to_string(rv));
  }
  return session;
}

CK_RV TokenConnection::login(CK_SESSION_HANDLE session) const {
  std::string pin(kUserPin);
  return p11_->C_Login(session, CKU_USER, reinterpret_cast<unsigned char*>(pin.data()), pin.size());
}

EcKeyPair generate_ec_key(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session) {
  // DER of the prime256v1 OID.
  std::array<unsigned char, 10> p256 = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  std::array public_template = {
      CK_ATTRIBUTE{CKA_EC_PARAMS, p256.data(), p256.size()},
      CK_ATTRIBUTE{CKA_VERIFY, &yes, sizeof(yes)},
      CK_ATTRIBUTE{CKA_TOKEN, &no, sizeof(no)},
  };
  std::array private_template = {
      CK_ATTRIBUTE{CKA_SIGN, &yes, sizeof(yes)},
      CK_ATTRIBUTE{CKA_TOKEN, &no, sizeof(no)},
      CK_ATTRIBUTE{CKA_PRIVATE, &yes, sizeof(yes)},
      CK_ATTRIBUTE{CKA_SENSITIVE, &yes, sizeof(yes)},
  };
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  EcKeyPair pair;
  const CK_RV rv = p11.C_GenerateKeyPair(
      session, &mechanism, public_template.data(), public_template.size(), private_template.data(),
      private_template.size(), &pair.public_key, &pair.private_key);
  if (rv != CKR_OK) {
    fail("C_GenerateKeyPair: " + std::to_string(rv));
  }
  return pair;
}

CK_RV sign_once(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE private_key,
                std::vector<unsigned char>* signature) {
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  if (const CK_RV rv = p11.C_SignInit(session, &mechanism, private_key); rv != CKR_OK) {
    return rv;
  }
  auto digest = test_digest();
  std::array<unsigned char, 64> buffer{};
  CK_ULONG length = buffer.size();
  const CK_RV rv = p11.C_Sign(session, digest.data(), digest.size(), buffer.data(), &length);
  if (rv == CKR_OK && signature != nullptr) {
    signature->assign(buffer.data(), buffer.data() + length);
  }
  return rv;
}

CK_RV verify_once(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE public_key,
                  const std::vector<unsigned char>& signature) {
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  if (const CK_RV rv = p11.C_VerifyInit(session, &mechanism, public_key); rv != CKR_OK) {
    return rv;
  }
  auto digest = test_digest();
  std::vector<unsigned char> copy = signature;
  return p11.C_Verify(session, digest.data(), digest.size(), copy.data(), copy.size());
}

std::string capture_stderr(const std::function<void()>& action) {
  const std::filesystem::path file = Harness::instance().directory() / "stderr.txt";
  std::fflush(stderr);
  const int saved = ::dup(STDERR_FILENO);
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (saved < 0 || fd < 0) {
    fail("cannot redirect stderr");
  }
  ::dup2(fd, STDERR_FILENO);
  ::close(fd);
  const auto restore = [saved] {
    std::fflush(stderr);
    ::dup2(saved, STDERR_FILENO);
    ::close(saved);
  };
  try {
    action();
  } catch (...) {
    restore();
    throw;
  }
  restore();
  std::ifstream in(file);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace hsm::fault::test
