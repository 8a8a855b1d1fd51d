#include "pkcs11/error.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <utility>

namespace hsm::agent::pkcs11 {
namespace {

struct RvName {
  CK_RV rv;
  std::string_view name;
};

// clang-format off
#define HSM_CKR(name) RvName{name, #name}
// clang-format on

// Sorted by value (checked by a static_assert below) so lookup is a binary search.
constexpr std::array kRvNames = {
    HSM_CKR(CKR_OK),
    HSM_CKR(CKR_CANCEL),
    HSM_CKR(CKR_HOST_MEMORY),
    HSM_CKR(CKR_SLOT_ID_INVALID),
    HSM_CKR(CKR_GENERAL_ERROR),
    HSM_CKR(CKR_FUNCTION_FAILED),
    HSM_CKR(CKR_ARGUMENTS_BAD),
    HSM_CKR(CKR_NO_EVENT),
    HSM_CKR(CKR_NEED_TO_CREATE_THREADS),
    HSM_CKR(CKR_CANT_LOCK),
    HSM_CKR(CKR_ATTRIBUTE_READ_ONLY),
    HSM_CKR(CKR_ATTRIBUTE_SENSITIVE),
    HSM_CKR(CKR_ATTRIBUTE_TYPE_INVALID),
    HSM_CKR(CKR_ATTRIBUTE_VALUE_INVALID),
    HSM_CKR(CKR_ACTION_PROHIBITED),
    HSM_CKR(CKR_DATA_INVALID),
    HSM_CKR(CKR_DATA_LEN_RANGE),
    HSM_CKR(CKR_DEVICE_ERROR),
    HSM_CKR(CKR_DEVICE_MEMORY),
    HSM_CKR(CKR_DEVICE_REMOVED),
    HSM_CKR(CKR_ENCRYPTED_DATA_INVALID),
    HSM_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE),
    HSM_CKR(CKR_FUNCTION_CANCELED),
    HSM_CKR(CKR_FUNCTION_NOT_PARALLEL),
    HSM_CKR(CKR_FUNCTION_NOT_SUPPORTED),
    HSM_CKR(CKR_KEY_HANDLE_INVALID),
    HSM_CKR(CKR_KEY_SIZE_RANGE),
    HSM_CKR(CKR_KEY_TYPE_INCONSISTENT),
    HSM_CKR(CKR_KEY_NOT_NEEDED),
    HSM_CKR(CKR_KEY_CHANGED),
    HSM_CKR(CKR_KEY_NEEDED),
    HSM_CKR(CKR_KEY_INDIGESTIBLE),
    HSM_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED),
    HSM_CKR(CKR_KEY_NOT_WRAPPABLE),
    HSM_CKR(CKR_KEY_UNEXTRACTABLE),
    HSM_CKR(CKR_MECHANISM_INVALID),
    HSM_CKR(CKR_MECHANISM_PARAM_INVALID),
    HSM_CKR(CKR_OBJECT_HANDLE_INVALID),
    HSM_CKR(CKR_OPERATION_ACTIVE),
    HSM_CKR(CKR_OPERATION_NOT_INITIALIZED),
    HSM_CKR(CKR_PIN_INCORRECT),
    HSM_CKR(CKR_PIN_INVALID),
    HSM_CKR(CKR_PIN_LEN_RANGE),
    HSM_CKR(CKR_PIN_EXPIRED),
    HSM_CKR(CKR_PIN_LOCKED),
    HSM_CKR(CKR_SESSION_CLOSED),
    HSM_CKR(CKR_SESSION_COUNT),
    HSM_CKR(CKR_SESSION_HANDLE_INVALID),
    HSM_CKR(CKR_SESSION_PARALLEL_NOT_SUPPORTED),
    HSM_CKR(CKR_SESSION_READ_ONLY),
    HSM_CKR(CKR_SESSION_EXISTS),
    HSM_CKR(CKR_SESSION_READ_ONLY_EXISTS),
    HSM_CKR(CKR_SESSION_READ_WRITE_SO_EXISTS),
    HSM_CKR(CKR_SIGNATURE_INVALID),
    HSM_CKR(CKR_SIGNATURE_LEN_RANGE),
    HSM_CKR(CKR_TEMPLATE_INCOMPLETE),
    HSM_CKR(CKR_TEMPLATE_INCONSISTENT),
    HSM_CKR(CKR_TOKEN_NOT_PRESENT),
    HSM_CKR(CKR_TOKEN_NOT_RECOGNIZED),
    HSM_CKR(CKR_TOKEN_WRITE_PROTECTED),
    HSM_CKR(CKR_UNWRAPPING_KEY_HANDLE_INVALID),
    HSM_CKR(CKR_UNWRAPPING_KEY_SIZE_RANGE),
    HSM_CKR(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT),
    HSM_CKR(CKR_USER_ALREADY_LOGGED_IN),
    HSM_CKR(CKR_USER_NOT_LOGGED_IN),
    HSM_CKR(CKR_USER_PIN_NOT_INITIALIZED),
    HSM_CKR(CKR_USER_TYPE_INVALID),
    HSM_CKR(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
    HSM_CKR(CKR_USER_TOO_MANY_TYPES),
    HSM_CKR(CKR_WRAPPED_KEY_INVALID),
    HSM_CKR(CKR_WRAPPED_KEY_LEN_RANGE),
    HSM_CKR(CKR_WRAPPING_KEY_HANDLE_INVALID),
    HSM_CKR(CKR_WRAPPING_KEY_SIZE_RANGE),
    HSM_CKR(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
    HSM_CKR(CKR_RANDOM_SEED_NOT_SUPPORTED),
    HSM_CKR(CKR_RANDOM_NO_RNG),
    HSM_CKR(CKR_DOMAIN_PARAMS_INVALID),
    HSM_CKR(CKR_CURVE_NOT_SUPPORTED),
    HSM_CKR(CKR_BUFFER_TOO_SMALL),
    HSM_CKR(CKR_SAVED_STATE_INVALID),
    HSM_CKR(CKR_INFORMATION_SENSITIVE),
    HSM_CKR(CKR_STATE_UNSAVEABLE),
    HSM_CKR(CKR_CRYPTOKI_NOT_INITIALIZED),
    HSM_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED),
    HSM_CKR(CKR_MUTEX_BAD),
    HSM_CKR(CKR_MUTEX_NOT_LOCKED),
    HSM_CKR(CKR_NEW_PIN_MODE),
    HSM_CKR(CKR_NEXT_OTP),
    HSM_CKR(CKR_EXCEEDED_MAX_ITERATIONS),
    HSM_CKR(CKR_FIPS_SELF_TEST_FAILED),
    HSM_CKR(CKR_LIBRARY_LOAD_FAILED),
    HSM_CKR(CKR_PIN_TOO_WEAK),
    HSM_CKR(CKR_PUBLIC_KEY_INVALID),
    HSM_CKR(CKR_FUNCTION_REJECTED),
};

#undef HSM_CKR

static_assert(std::is_sorted(kRvNames.begin(), kRvNames.end(),
                             [](const RvName& a, const RvName& b) { return a.rv < b.rv; }),
              "kRvNames must stay sorted by value");

}  // namespace

std::string_view ckr_name(CK_RV rv) noexcept {
  const auto* it =
      std::lower_bound(kRvNames.begin(), kRvNames.end(), rv,
                       [](const RvName& entry, CK_RV value) { return entry.rv < value; });
  if (it != kRvNames.end() && it->rv == rv) return it->name;
  if (rv >= CKR_VENDOR_DEFINED) return "CKR_VENDOR_DEFINED";
  return "CKR_UNKNOWN";
}

std::string describe_rv(CK_RV rv) {
  std::array<char, 24> hex{};
  std::snprintf(hex.data(), hex.size(), "0x%lX", rv);
  std::string out{ckr_name(rv)};
  out += " (";
  out += hex.data();
  out += ')';
  return out;
}

ErrorClass classify(CK_RV rv) noexcept {
  switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
      return ErrorClass::kSession;
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_GENERAL_ERROR:
      return ErrorClass::kToken;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
      return ErrorClass::kPin;
    default:
      return ErrorClass::kOther;
  }
}

bool is_stale_handle(CK_RV rv) noexcept {
  return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID;
}

Pkcs11Error::Pkcs11Error(std::string_view function, CK_RV rv)
    : std::runtime_error(std::string{function} + " failed: " + describe_rv(rv)),
      rv_(rv),
      function_(function) {}

}  // namespace hsm::agent::pkcs11
