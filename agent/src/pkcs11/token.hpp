// Token: the selected slot, its token's description, and the one login the agent holds.
//
// Ownership: Token owns the anchor session: a session opened at start, logged in once, and kept
// open for the agent's life, because a PKCS#11 login lasts only while the application has at
// least one session open on the token. Every other session (SessionPool) shares that login.
// Destroy the Token (logout, close) before the Module, after the SessionPool.
//
// Thread-safety: after construction every const member but anchor_session_info() may be called
// from any thread (they use slot-level calls, never the anchor session). anchor_session_info()
// uses the anchor session: one thread at a time (the token probe).
//
// Logins are counted in hsm_agent_logins_total{result}: "ok" (CKR_OK or
// CKR_USER_ALREADY_LOGGED_IN), else the CKR name of the refusal.
#pragma once

#include <p11-kit/pkcs11.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "pkcs11/secret.hpp"
#include "pkcs11/session.hpp"
#include "service/key_service.hpp"

namespace hsm::agent::pkcs11 {

class Module;

/// The token was found but refused the PIN (CKR_PIN_INCORRECT, _LOCKED, _EXPIRED, ...).
/// Never retried: another attempt can lock the token. what() is one line naming the condition
/// in words, the CKR and the operator's remedy, which differs per condition (a locked PIN is not
/// a wrong one), e.g. "locked user PIN for token 'X': CKR_PIN_LOCKED (not retried); the token's
/// security officer must unlock it ...". It never holds the PIN.
class PinRejectedError : public StartupError {
 public:
  PinRejectedError(const std::string& token_label, CK_RV rv);
  /// The refusal's CKR name ("CKR_PIN_LOCKED").
  [[nodiscard]] std::string_view ckr() const noexcept;

 private:
  CK_RV rv_;
};

/// Which token: by label (matched against the tokens present, both sides trimmed of blanks) or
/// by index into the list of slots that have a token. The label wins when both are set (the
/// config layer is expected to reject that); neither is a StartupError.
struct TokenSelector {
  std::optional<std::string> label;
  std::optional<unsigned> slot_index;
};

/// The slot chosen by `selector`. Throws StartupError listing the tokens that were found.
[[nodiscard]] CK_SLOT_ID find_slot(const Module& module, const TokenSelector& selector);

/// Whether the token's library is known to break when token objects are created while other
/// threads read objects (ObjectChangeGate): SoftHSMv2 (model "SoftHSM v2"), every version so
/// far (SoftHSMv2 issue 573).
[[nodiscard]] bool needs_serialized_object_changes(const protocol::TokenDescription& token);

/// A fixed-width, blank-padded PKCS#11 string field as a trimmed std::string.
[[nodiscard]] std::string trim_field(const unsigned char* field, std::size_t size);

class Token {
 public:
  /// Finds the slot, reads the token info, opens the anchor session (read-only when
  /// `read_only`) and logs the user in with `pin` (CKR_USER_ALREADY_LOGGED_IN is success).
  /// Throws StartupError (PinRejectedError for a refused PIN); the message never holds the PIN.
  Token(const Module& module, const TokenSelector& selector, const SecretString& pin,
        bool read_only);
  /// Logs out (errors logged, not thrown) and closes the anchor session.
  ~Token();
  Token(const Token&) = delete;
  Token& operator=(const Token&) = delete;
  Token(Token&&) = delete;
  Token& operator=(Token&&) = delete;

  [[nodiscard]] const Module& module() const noexcept { return module_; }
  [[nodiscard]] CK_SLOT_ID slot() const noexcept { return slot_; }
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }
  [[nodiscard]] const protocol::TokenDescription& description() const noexcept {
    return description_;
  }

  /// A fresh C_GetTokenInfo: really asks the token (health checks use it). Throws Pkcs11Error.
  [[nodiscard]] CK_TOKEN_INFO info() const;
  /// C_GetSessionInfo on the anchor session: proves the library, the token and the anchor
  /// session answer, and tells whether the login still holds (has_user_login). Throws
  /// Pkcs11Error. Not concurrently with itself (see the thread-safety note above).
  [[nodiscard]] CK_SESSION_INFO anchor_session_info() const;
  /// Whether a session in this state is logged in as the user.
  [[nodiscard]] static bool has_user_login(const CK_SESSION_INFO& info) noexcept;
  /// C_GetMechanismList. Throws Pkcs11Error.
  [[nodiscard]] std::vector<CK_MECHANISM_TYPE> mechanisms() const;
  /// C_GetMechanismInfo; nullopt when the token does not know the mechanism.
  [[nodiscard]] std::optional<CK_MECHANISM_INFO> mechanism_info(CK_MECHANISM_TYPE type) const;
  /// A new session on this token (read-write unless read_only()). Throws Pkcs11Error.
  [[nodiscard]] Session open_session() const;

  /// Ends the login (C_Logout on the anchor session). Idempotent; never throws.
  void logout() noexcept;

 private:
  void login(const SecretString& pin);

  const Module& module_;
  CK_SLOT_ID slot_;
  bool read_only_;
  protocol::TokenDescription description_;
  Session anchor_;
  bool logged_in_ = false;
};

}  // namespace hsm::agent::pkcs11
