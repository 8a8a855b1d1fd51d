// hsm-bench-direct: the baseline. Loads a PKCS#11 module in-process (dlopen, as an application
// without the agent would), logs in once, finds the ES256 key once, then T threads each with its
// own session sign for a fixed time. Each signature is what the agent does for a `sign` request:
// SHA-256 of a fixed 32-byte message (OpenSSL), C_SignInit(CKM_ECDSA) + one C_Sign into a
// buffer sized in advance. Prints one JSON line (latency_report.hpp) on stdout.
//
// Deliberately self-contained: it shares no code with the agent, so the agent's overhead is
// measured against an independent implementation. The same program measures p11-kit remoting
// when --module is p11-kit-client.so (P11_KIT_SERVER_ADDRESS in the environment).
//
// The PIN is read from --pin-file only (never argv), held in a buffer wiped after C_Login.

#include <dlfcn.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <p11-kit/pkcs11.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "latency_report.hpp"

namespace hsm::bench {
namespace {

// ---- Errors ----------------------------------------------------------------------------------

/// The few CK_RV names a benchmark run is likely to meet; others print as hex.
constexpr std::pair<CK_RV, std::string_view> kRvNames[] = {
    {CKR_OK, "CKR_OK"},
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
};

std::string rv_name(CK_RV rv) {
  for (const auto& [value, name] : kRvNames) {
    if (value == rv) return std::string(name);
  }
  char hex[32];
  std::snprintf(hex, sizeof hex, "CKR 0x%08lx", rv);
  return hex;
}

/// A failed PKCS#11 call during set-up: "C_Login: CKR_PIN_INCORRECT".
class Pkcs11Failure : public std::runtime_error {
 public:
  Pkcs11Failure(std::string_view function, CK_RV rv)
      : std::runtime_error(std::string(function) + ": " + rv_name(rv)) {}
};

void check(CK_RV rv, std::string_view function) {
  if (rv != CKR_OK) throw Pkcs11Failure(function, rv);
}

// ---- Resources -------------------------------------------------------------------------------

/// The PIN bytes, wiped on destruction.
class SecretBytes {
 public:
  explicit SecretBytes(std::vector<char> bytes) : bytes_(std::move(bytes)) {}
  ~SecretBytes() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;

  /// The first line of `path` (a trailing newline is not part of the PIN).
  [[nodiscard]] static SecretBytes from_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read the PIN file " + path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto end =
        std::find_if(bytes.begin(), bytes.end(), [](char c) { return c == '\n' || c == '\r'; });
    std::fill(end, bytes.end(), '\0');
    bytes.resize(static_cast<std::size_t>(end - bytes.begin()));
    return SecretBytes(std::move(bytes));
  }

  [[nodiscard]] CK_UTF8CHAR_PTR data() noexcept {
    return reinterpret_cast<CK_UTF8CHAR_PTR>(bytes_.data());
  }
  [[nodiscard]] CK_ULONG size() const noexcept { return static_cast<CK_ULONG>(bytes_.size()); }

 private:
  std::vector<char> bytes_;
};

struct DlCloser {
  void operator()(void* handle) const noexcept { ::dlclose(handle); }
};
using DlHandle = std::unique_ptr<void, DlCloser>;

/// The loaded and initialised module: dlopen + C_GetFunctionList + C_Initialize, undone in
/// reverse by the destructor. Thread-safety: initialised with CKF_OS_LOCKING_OK, so the
/// function list may be used from every thread.
class Pkcs11Library {
 public:
  explicit Pkcs11Library(const std::string& path) {
    handle_.reset(::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL));
    if (!handle_) {
      const char* why = ::dlerror();
      throw std::runtime_error("cannot load " + path + ": " + (why != nullptr ? why : "?"));
    }
    // POSIX: dlsym's void* converts to a function pointer (the one sanctioned use of this cast).
    auto* get_function_list =
        reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle_.get(), "C_GetFunctionList"));
    if (get_function_list == nullptr) throw std::runtime_error(path + ": no C_GetFunctionList");
    check(get_function_list(&api_), "C_GetFunctionList");
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    check(api_->C_Initialize(&args), "C_Initialize");
  }
  ~Pkcs11Library() { api_->C_Finalize(nullptr); }
  Pkcs11Library(const Pkcs11Library&) = delete;
  Pkcs11Library& operator=(const Pkcs11Library&) = delete;

  [[nodiscard]] const CK_FUNCTION_LIST& api() const noexcept { return *api_; }

 private:
  DlHandle handle_;  // declared first: closed after C_Finalize
  CK_FUNCTION_LIST* api_ = nullptr;
};

/// One read-write session, closed by the destructor. Used by one thread at a time.
class Session {
 public:
  Session(const CK_FUNCTION_LIST& api, CK_SLOT_ID slot) : api_(&api) {
    check(api.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &handle_),
          "C_OpenSession");
  }
  ~Session() {
    if (handle_ != CK_INVALID_HANDLE) api_->C_CloseSession(handle_);
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  [[nodiscard]] CK_SESSION_HANDLE handle() const noexcept { return handle_; }
  [[nodiscard]] const CK_FUNCTION_LIST& api() const noexcept { return *api_; }

 private:
  const CK_FUNCTION_LIST* api_;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
};

// ---- Token and key ---------------------------------------------------------------------------

/// DER of the OID prime256v1 (P-256), as CKA_EC_PARAMS holds it.
constexpr std::array<CK_BYTE, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                 0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr std::size_t kEs256SignatureBytes = 64;  // r || s
constexpr std::size_t kMessageBytes = 32;

template <typename T>
CK_ATTRIBUTE attribute(CK_ATTRIBUTE_TYPE type, T& value) {
  return {type, &value, sizeof value};
}
CK_ATTRIBUTE bytes_attribute(CK_ATTRIBUTE_TYPE type, std::string_view bytes) {
  return {type, const_cast<char*>(bytes.data()), static_cast<CK_ULONG>(bytes.size())};
}

/// The slot whose token has `label` (blank-padded in CK_TOKEN_INFO); the first slot with a
/// token when `label` is empty.
CK_SLOT_ID find_slot(const CK_FUNCTION_LIST& api, const std::string& label) {
  CK_ULONG count = 0;
  check(api.C_GetSlotList(CK_TRUE, nullptr, &count), "C_GetSlotList");
  std::vector<CK_SLOT_ID> slots(count);
  check(api.C_GetSlotList(CK_TRUE, slots.data(), &count), "C_GetSlotList");
  slots.resize(count);
  for (const CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (api.C_GetTokenInfo(slot, &info) != CKR_OK) continue;
    std::string_view found(reinterpret_cast<const char*>(info.label), sizeof info.label);
    found = found.substr(0, found.find_last_not_of(' ') + 1);
    if (label.empty() || found == label) return slot;
  }
  throw std::runtime_error(label.empty() ? "no slot has a token"
                                         : "no token labelled '" + label + "'");
}

/// Private-key objects labelled `label` (at most two: enough to tell "ambiguous").
std::vector<CK_OBJECT_HANDLE> find_private_keys(const Session& session, const std::string& label) {
  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  std::array<CK_ATTRIBUTE, 2> query = {attribute(CKA_CLASS, key_class),
                                       bytes_attribute(CKA_LABEL, label)};
  const CK_FUNCTION_LIST& api = session.api();
  check(api.C_FindObjectsInit(session.handle(), query.data(), query.size()), "C_FindObjectsInit");
  std::array<CK_OBJECT_HANDLE, 2> found{};
  CK_ULONG count = 0;
  const CK_RV rv = api.C_FindObjects(session.handle(), found.data(), found.size(), &count);
  check(api.C_FindObjectsFinal(session.handle()), "C_FindObjectsFinal");
  check(rv, "C_FindObjects");
  return {found.begin(), found.begin() + static_cast<std::ptrdiff_t>(count)};
}

/// Generates a P-256 key pair labelled `label`, with the attributes the agent gives its keys
/// (CKA_ID = label, sensitive, not extractable).
CK_OBJECT_HANDLE generate_es256_key(const Session& session, const std::string& label) {
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY, private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE key_type = CKK_EC;
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  std::array<CK_BYTE, kP256Params.size()> params = kP256Params;
  std::array<CK_ATTRIBUTE, 7> public_template = {attribute(CKA_CLASS, public_class),
                                                 attribute(CKA_KEY_TYPE, key_type),
                                                 attribute(CKA_TOKEN, yes),
                                                 attribute(CKA_VERIFY, yes),
                                                 bytes_attribute(CKA_LABEL, label),
                                                 bytes_attribute(CKA_ID, label),
                                                 {CKA_EC_PARAMS, params.data(), params.size()}};
  std::array<CK_ATTRIBUTE, 9> private_template = {attribute(CKA_CLASS, private_class),
                                                  attribute(CKA_KEY_TYPE, key_type),
                                                  attribute(CKA_TOKEN, yes),
                                                  attribute(CKA_PRIVATE, yes),
                                                  attribute(CKA_SIGN, yes),
                                                  attribute(CKA_SENSITIVE, yes),
                                                  attribute(CKA_EXTRACTABLE, no),
                                                  bytes_attribute(CKA_LABEL, label),
                                                  bytes_attribute(CKA_ID, label)};
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE, private_key = CK_INVALID_HANDLE;
  check(session.api().C_GenerateKeyPair(session.handle(), &mechanism, public_template.data(),
                                        public_template.size(), private_template.data(),
                                        private_template.size(), &public_key, &private_key),
        "C_GenerateKeyPair");
  return private_key;
}

/// Fails unless `key` is a P-256 EC key (so that every mode measures ES256).
void check_es256(const Session& session, CK_OBJECT_HANDLE key) {
  CK_KEY_TYPE key_type = 0;
  std::array<CK_BYTE, 64> params{};
  std::array<CK_ATTRIBUTE, 2> attributes = {attribute(CKA_KEY_TYPE, key_type),
                                            {CKA_EC_PARAMS, params.data(), params.size()}};
  check(session.api().C_GetAttributeValue(session.handle(), key, attributes.data(),
                                          attributes.size()),
        "C_GetAttributeValue");
  const bool p256 = key_type == CKK_EC && attributes[1].ulValueLen == kP256Params.size() &&
                    std::equal(kP256Params.begin(), kP256Params.end(), params.begin());
  if (!p256) throw std::runtime_error("the key is not an EC P-256 (ES256) key");
}

// ---- The run ---------------------------------------------------------------------------------

struct Options {
  std::string module;
  std::string token_label;
  std::string pin_file;
  std::string kid = "bench-es256";
  bool create_key = false;
  bool setup_only = false;
  unsigned threads = 1;
  unsigned duration_ms = 5000;
  unsigned warmup_ms = 500;
  std::vector<int> server_pids;  // whose CPU time to report (p11-kit server)
};

/// One thread's loop: sign until the window ends, sampling what completes inside it.
void sign_loop(const Session& session, CK_OBJECT_HANDLE key, const MeasurementWindow& window,
               LatencyHistogram& latencies, ErrorLog& errors) {
  const CK_FUNCTION_LIST& api = session.api();
  static constexpr std::array<unsigned char, kMessageBytes> kMessage = {
      'h', 's', 'm', '-', 's', 'i', 'd', 'e', 'c', 'a', 'r', ' ', 'b', 'e', 'n', 'c',
      'h', ' ', 'm', 'e', 's', 's', 'a', 'g', 'e', ' ', '3', '2', 'b', 'y', 't', 'e'};
  std::array<CK_BYTE, SHA256_DIGEST_LENGTH> digest{};
  // Room for a token that answers in DER (72 bytes for P-256), as the agent leaves.
  std::array<CK_BYTE, 80> signature{};
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};

  for (Clock::time_point now = Clock::now(); now < window.end;) {
    const Clock::time_point started = now;
    SHA256(kMessage.data(), kMessage.size(), digest.data());
    std::string_view failed = "C_SignInit";
    CK_RV rv = api.C_SignInit(session.handle(), &mechanism, key);
    CK_ULONG length = signature.size();
    if (rv == CKR_OK) {
      failed = "C_Sign";
      rv = api.C_Sign(session.handle(), digest.data(), digest.size(), signature.data(), &length);
    }
    now = Clock::now();
    if (rv != CKR_OK) {
      errors.record(std::string(failed) + ": " + rv_name(rv));
    } else if (length != kEs256SignatureBytes) {
      errors.record("C_Sign returned " + std::to_string(length) + " bytes, not 64");
    } else if (window.counts(now)) {
      latencies.record(now - started);
    }
  }
}

int run(const Options& options) {
  const Pkcs11Library library(options.module);
  const CK_FUNCTION_LIST& api = library.api();
  const CK_SLOT_ID slot = find_slot(api, options.token_label);

  // Every session of this process shares the one login (PKCS#11 logs in the application).
  std::vector<std::unique_ptr<Session>> sessions;
  for (unsigned i = 0; i < std::max(1U, options.threads); ++i) {
    sessions.push_back(std::make_unique<Session>(api, slot));
  }
  {
    SecretBytes pin = SecretBytes::from_file(options.pin_file);
    const CK_RV rv = api.C_Login(sessions.front()->handle(), CKU_USER, pin.data(), pin.size());
    if (rv != CKR_USER_ALREADY_LOGGED_IN) check(rv, "C_Login");
  }

  const std::vector<CK_OBJECT_HANDLE> keys = find_private_keys(*sessions.front(), options.kid);
  if (keys.size() > 1)
    throw std::runtime_error("more than one private key is labelled " + options.kid);
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  if (!keys.empty()) {
    key = keys.front();
  } else if (options.create_key) {
    key = generate_es256_key(*sessions.front(), options.kid);
  } else {
    throw std::runtime_error("no private key labelled '" + options.kid +
                             "' (pass --create-key to make one)");
  }
  check_es256(*sessions.front(), key);
  if (options.setup_only) {
    std::cerr << "hsm-bench-direct: key '" << options.kid << "' is ready\n";
    return 0;
  }

  std::vector<std::unique_ptr<LatencyHistogram>> latencies;
  for (std::size_t i = 0; i < sessions.size(); ++i) {
    latencies.push_back(std::make_unique<LatencyHistogram>());
  }
  ErrorLog errors;
  const MeasurementWindow window = MeasurementWindow::starting_now(
      std::chrono::milliseconds(options.warmup_ms), std::chrono::milliseconds(options.duration_ms));
  CpuSample cpu;
  {
    std::vector<std::jthread> threads;
    for (std::size_t i = 0; i < sessions.size(); ++i) {
      threads.emplace_back(sign_loop, std::cref(*sessions[i]), key, std::cref(window),
                           std::ref(*latencies[i]), std::ref(errors));
    }
    cpu = cpu_during(window, options.server_pids);
  }

  LatencyHistogram all;
  for (const auto& one : latencies) all.merge(*one);
  Report report;
  report.mode = "direct";
  report.settings = {{"module", json_string(options.module)},
                     {"threads", std::to_string(sessions.size())}};
  report.concurrency = sessions.size();
  report.seconds = window.seconds();
  report.errors = errors.count();
  report.first_error = errors.first();
  report.latencies = &all;
  report.cpu = cpu;
  report.has_server = !options.server_pids.empty();
  write_json(std::cout, report);
  std::cout.flush();
  return all.count() > 0 ? 0 : 1;
}

}  // namespace
}  // namespace hsm::bench

int main(int argc, char** argv) {
  hsm::bench::Options options;
  CLI::App app{"hsm-bench-direct: ES256 signing throughput and latency, in-process PKCS#11"};
  app.add_option("--module", options.module, "PKCS#11 module to dlopen")->required();
  app.add_option("--token-label", options.token_label, "token label (default: the first token)");
  app.add_option("--pin-file", options.pin_file, "file holding the user PIN")->required();
  app.add_option("--kid", options.kid, "CKA_LABEL of the ES256 private key")->capture_default_str();
  app.add_flag("--create-key", options.create_key, "generate the key when it is missing");
  app.add_flag("--setup-only", options.setup_only, "log in, find or create the key, and exit");
  app.add_option("--threads", options.threads, "signing threads, one session each")
      ->capture_default_str()
      ->check(CLI::Range(1U, 4096U));
  app.add_option("--duration-ms", options.duration_ms, "measured time")
      ->capture_default_str()
      ->check(CLI::Range(1U, 3'600'000U));
  app.add_option("--warmup-ms", options.warmup_ms, "signing before the measurement starts")
      ->capture_default_str();
  app.add_option("--server-pid", options.server_pids,
                 "also report the CPU time of this process and its children (repeatable)");
  CLI11_PARSE(app, argc, argv);
  try {
    return hsm::bench::run(options);
  } catch (const std::exception& e) {
    std::cerr << "hsm-bench-direct: " << e.what() << '\n';
    return 1;
  }
}
