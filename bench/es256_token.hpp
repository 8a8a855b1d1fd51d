// In-process ES256 signing on a PKCS#11 module, as the benchmark's own programs do it: the
// module dlopen()ed and initialised, one login, the key found once, then signatures on
// per-thread sessions. Shared by hsm-bench-direct (the application signing in its own threads)
// and hsm-bench-floor (the same signatures behind the thinnest possible process boundary), so
// that both measure the very same operation. It shares no code with the agent: the agent's
// overhead is measured against an independent implementation.
#pragma once

#include <p11-kit/pkcs11.h>

#include <array>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>

namespace hsm::bench {

/// Every benchmark signature is over this fixed 32-byte message.
constexpr std::size_t kMessageBytes = 32;
inline constexpr std::array<unsigned char, kMessageBytes> kBenchMessage = {
    'h', 's', 'm', '-', 's', 'i', 'd', 'e', 'c', 'a', 'r', ' ', 'b', 'e', 'n', 'c',
    'h', ' ', 'm', 'e', 's', 's', 'a', 'g', 'e', ' ', '3', '2', 'b', 'y', 't', 'e'};
/// An ES256 signature as PKCS#11 returns it: r || s.
constexpr std::size_t kEs256SignatureBytes = 64;
/// The buffer a signature is made into: room for a token that answers in DER (72 bytes for
/// P-256), as the agent leaves.
constexpr std::size_t kSignatureBufferBytes = 80;

/// The loaded and initialised module: dlopen + C_GetFunctionList + C_Initialize, undone in
/// reverse by the destructor. Thread-safety: initialised with CKF_OS_LOCKING_OK, so the
/// function list may be used from every thread. Throws std::runtime_error when it cannot load.
class Pkcs11Library {
 public:
  explicit Pkcs11Library(const std::string& path);
  ~Pkcs11Library();
  Pkcs11Library(const Pkcs11Library&) = delete;
  Pkcs11Library& operator=(const Pkcs11Library&) = delete;

  [[nodiscard]] const CK_FUNCTION_LIST& api() const noexcept { return *api_; }

 private:
  struct DlCloser {
    void operator()(void* handle) const noexcept;
  };
  std::unique_ptr<void, DlCloser> handle_;  // declared first: closed after C_Finalize
  CK_FUNCTION_LIST* api_ = nullptr;
};

/// One read-write session, closed by the destructor. Used by one thread at a time.
class Session {
 public:
  Session(const CK_FUNCTION_LIST& api, CK_SLOT_ID slot);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  [[nodiscard]] CK_SESSION_HANDLE handle() const noexcept { return handle_; }
  [[nodiscard]] const CK_FUNCTION_LIST& api() const noexcept { return *api_; }

 private:
  const CK_FUNCTION_LIST* api_;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
};

struct TokenSettings {
  std::string module;       ///< the PKCS#11 module to dlopen
  std::string token_label;  ///< empty: the first slot with a token
  std::string pin_file;     ///< the user PIN, first line (never taken from argv)
  std::string kid;          ///< CKA_LABEL of the private key
  bool create_key = false;  ///< generate the key pair when no key has that label
};

/// The module loaded, the user logged in and the ES256 (P-256) private key found, or made with
/// `create_key`, once: what every signing thread needs. The PIN is read from the file into a
/// buffer wiped right after C_Login.
///
/// Throws std::runtime_error (a PKCS#11 failure names the function and the CKR_ value) when the
/// module, token or key is not there, the login fails, or the key is not ES256.
/// Thread-safety: open_session() and key() may be called from any thread. Every Session it
/// opened must be destroyed before the Es256Token.
class Es256Token {
 public:
  explicit Es256Token(const TokenSettings& settings);
  ~Es256Token();
  Es256Token(const Es256Token&) = delete;
  Es256Token& operator=(const Es256Token&) = delete;

  /// A new session for one signing thread; it shares the token's login (PKCS#11 logs in the
  /// application, not the session). Throws on failure.
  [[nodiscard]] std::unique_ptr<Session> open_session() const;
  [[nodiscard]] CK_OBJECT_HANDLE key() const noexcept { return key_; }

 private:
  Pkcs11Library library_;  // declared first: finalised after the login session is closed
  CK_SLOT_ID slot_ = 0;
  // Held open for the token's lifetime: closing an application's last session logs it out.
  std::unique_ptr<Session> login_session_;
  CK_OBJECT_HANDLE key_ = CK_INVALID_HANDLE;
};

/// One signature, the operation every mode of the benchmark measures and what the agent does
/// for a `sign` request: SHA-256 of `message`, then C_SignInit(CKM_ECDSA) and one C_Sign of the
/// digest into `signature` (at least kSignatureBufferBytes; on success its first 64 bytes hold
/// r || s). Returns std::nullopt on success, else what failed ("C_Sign: CKR_DEVICE_ERROR", or a
/// signature that is not 64 bytes). Allocates only to describe a failure.
[[nodiscard]] std::optional<std::string> sign_es256(const Session& session, CK_OBJECT_HANDLE key,
                                                    std::span<const unsigned char> message,
                                                    std::span<CK_BYTE> signature);

}  // namespace hsm::bench
