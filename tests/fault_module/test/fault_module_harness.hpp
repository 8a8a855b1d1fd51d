// Test harness for libhsm_fault_pkcs11.so: a private SoftHSMv2 token, the module loaded with
// dlopen in front of it, helpers to write the control file and read the stats file, and a few
// PKCS#11 calls (EC key generation, sign) that the tests share.
//
// Local rather than tests/fixtures/softhsm_token.hpp: that fixture library also needs the agent
// and hsmctl targets, and this folder is built on its own too. Same recipe (STYLE.md item 10).
#pragma once

#include <p11-kit/pkcs11.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::fault::test {

inline constexpr std::string_view kTokenLabel = "fault-test";
inline constexpr std::string_view kUserPin = "1234";
inline constexpr std::string_view kSoPin = "5678";

/// Process-wide (created on first use, torn down at exit): a temporary directory with the token,
/// softhsm2.conf, the control file and the stats file; SOFTHSM2_CONF, HSM_FAULT_CONTROL,
/// HSM_FAULT_STATS and HSM_FAULT_POLL_US=0 (re-check the control file on every call, so a rule
/// written before a call is in force for that call) set; the module dlopen'ed. Not thread-safe:
/// call it on the test thread.
class Harness {
 public:
  static Harness& instance();
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;
  Harness(Harness&&) = delete;
  Harness& operator=(Harness&&) = delete;
  ~Harness();

  [[nodiscard]] CK_FUNCTION_LIST& p11() const noexcept { return *functions_; }
  [[nodiscard]] void* library() const noexcept { return library_; }
  [[nodiscard]] const std::filesystem::path& directory() const noexcept { return dir_; }

  /// Replaces the control file atomically (temporary file + rename), as the README advises.
  void write_rules(std::string_view text) const;
  /// Deletes the control file: no faults.
  void remove_rules() const;

  /// The stats file as `name -> value` (empty if it does not exist yet).
  [[nodiscard]] std::map<std::string, std::uint64_t> read_stats() const;
  [[nodiscard]] std::uint64_t stat(const std::string& key) const;
  /// Polls the stats file until `key` reaches `at_least` or `timeout` passes; the last value.
  std::uint64_t wait_for_stat(const std::string& key, std::uint64_t at_least,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10)) const;

  /// Copies the module to a new file in directory(): dlopen() of the copy gives a separate
  /// instance with its own state, which reads its environment afresh.
  [[nodiscard]] std::filesystem::path copy_module();
  /// dlopen()s `module` with `environment` applied while it reads its environment (empty value:
  /// unset), then restores the environment; returns its function list. Never unloaded.
  [[nodiscard]] static CK_FUNCTION_LIST* load_module(
      const std::filesystem::path& module, const std::map<std::string, std::string>& environment);

 private:
  Harness();

  std::filesystem::path dir_;
  std::filesystem::path control_;
  std::filesystem::path stats_;
  void* library_ = nullptr;
  CK_FUNCTION_LIST* functions_ = nullptr;
  int copies_ = 0;
};

/// C_Initialize on construction (with the control file removed first, so a test starts without
/// faults); on destruction the control file is removed and C_Finalize called (unless finalize()
/// already was). Looks up the fault-test token's slot.
class TokenConnection {
 public:
  TokenConnection();
  ~TokenConnection();
  TokenConnection(const TokenConnection&) = delete;
  TokenConnection& operator=(const TokenConnection&) = delete;
  TokenConnection(TokenConnection&&) = delete;
  TokenConnection& operator=(TokenConnection&&) = delete;

  [[nodiscard]] CK_FUNCTION_LIST& p11() const noexcept { return *p11_; }
  [[nodiscard]] CK_SLOT_ID slot() const noexcept { return slot_; }

  /// A read-write session (closed by C_Finalize).
  [[nodiscard]] CK_SESSION_HANDLE open_session() const;
  [[nodiscard]] CK_RV login(CK_SESSION_HANDLE session) const;
  /// C_Finalize now; the result of it.
  CK_RV finalize();

 private:
  CK_FUNCTION_LIST* p11_;
  CK_SLOT_ID slot_ = 0;
  bool finalized_ = false;
};

struct EcKeyPair {
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
};

/// A P-256 session key pair (gone after C_Finalize). Requires a logged-in session.
[[nodiscard]] EcKeyPair generate_ec_key(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session);

/// C_SignInit + C_Sign (CKM_ECDSA) over a fixed 32-byte digest: the first failing CK_RV, or
/// CKR_OK with the signature in `signature` (if given).
[[nodiscard]] CK_RV sign_once(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session,
                              CK_OBJECT_HANDLE private_key,
                              std::vector<unsigned char>* signature = nullptr);

/// C_VerifyInit + C_Verify of `signature` over the digest sign_once() signs.
[[nodiscard]] CK_RV verify_once(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session,
                                CK_OBJECT_HANDLE public_key,
                                const std::vector<unsigned char>& signature);

/// Runs `action` with stderr redirected to a file; returns what was written to stderr.
[[nodiscard]] std::string capture_stderr(const std::function<void()>& action);

}  // namespace hsm::fault::test
