#pragma once
// A token with a session limit, as many real HSMs are (SoftHSMv2 has none): with
// HSM_FAULT_MAX_SESSIONS=N the module states N as CK_TOKEN_INFO.ulMaxSessionCount and refuses
// the (N+1)th open session with CKR_SESSION_COUNT, as such a token does.

#include <p11-kit/pkcs11.h>

#include <cstddef>
#include <mutex>
#include <optional>

namespace hsm::fault {

class SessionLimit {
 public:
  /// nullopt: no limit (pure forwarding).
  explicit SessionLimit(std::optional<std::size_t> max_sessions) : max_(max_sessions) {}

  /// Before C_OpenSession is forwarded: CKR_SESSION_COUNT when the limit is reached, else
  /// nullopt, and the session counts as open until closed() or the call failing (opened(rv)).
  std::optional<CK_RV> reserve();
  /// After the forwarded C_OpenSession: gives the reservation back when it failed.
  void opened(CK_RV rv);
  /// After a successful C_CloseSession.
  void closed();
  /// After C_CloseAllSessions or C_Finalize: nothing is open.
  void reset();
  /// Writes the limit into a C_GetTokenInfo answer.
  void state(CK_TOKEN_INFO& info) const;

 private:
  const std::optional<std::size_t> max_;
  std::mutex mutex_;
  std::size_t open_ = 0;
};

}  // namespace hsm::fault
