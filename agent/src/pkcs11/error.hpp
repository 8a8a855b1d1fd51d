// PKCS#11 errors: the one place where a CK_RV becomes a typed C++ error (Pkcs11Error), with the
// CKR_ name from one table, and the classification that drives recovery (docs/reliability.md):
//   session: the session or an object handle is gone; discard it, look up afresh, retry once;
//   token:   the token or the library is gone; mark the token down and re-initialise;
//   pin:     the PIN was refused; never retried (a retry can lock the token);
//   other:   everything else (bad mechanism, bad template, ...); reported as hsm_error.
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace hsm::agent::pkcs11 {

enum class ErrorClass : std::uint8_t { kSession, kToken, kPin, kOther };

/// "CKR_DEVICE_ERROR" for a known value; "CKR_VENDOR_DEFINED" for vendor values and
/// "CKR_UNKNOWN" for anything else, so the result is safe as a bounded metric label.
[[nodiscard]] std::string_view ckr_name(CK_RV rv) noexcept;

/// "CKR_DEVICE_ERROR (0x30)": the name and the value, for messages and logs.
[[nodiscard]] std::string describe_rv(CK_RV rv);

[[nodiscard]] ErrorClass classify(CK_RV rv) noexcept;

/// CKR_OBJECT_HANDLE_INVALID / CKR_KEY_HANDLE_INVALID: session-class errors that mean a cached
/// object handle (not the session) went stale.
[[nodiscard]] bool is_stale_handle(CK_RV rv) noexcept;

/// A PKCS#11 call returned something other than CKR_OK (or an explicitly accepted value).
/// what() is "<function> failed: <CKR name> (<hex>)"; never contains secrets.
class Pkcs11Error : public std::runtime_error {
 public:
  Pkcs11Error(std::string_view function, CK_RV rv);

  [[nodiscard]] CK_RV rv() const noexcept { return rv_; }
  [[nodiscard]] std::string_view function() const noexcept { return function_; }
  [[nodiscard]] std::string_view ckr() const noexcept { return ckr_name(rv_); }
  [[nodiscard]] ErrorClass error_class() const noexcept { return classify(rv_); }

 private:
  CK_RV rv_;
  std::string_view function_;  // points at a static name from the function table
};

}  // namespace hsm::agent::pkcs11
