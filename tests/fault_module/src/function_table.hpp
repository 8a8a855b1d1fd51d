// The one list of PKCS#11 2.40 functions the fault module knows about. Everything that differs per
// function (the forwarding entry points, the CK_FUNCTION_LIST we hand out, names for the control
// file and the stats file, call counters) is generated from this list, so there is no
// per-function copy to get out of step.
#pragma once

#include <p11-kit/pkcs11.h>

#include <array>
#include <cstddef>
#include <optional>
#include <string_view>

namespace hsm::fault {

/// How a function relates to sessions, which decides what a fault rule can match and what an
/// injected error does to the real token.
enum class CallKind {
  kGlobal,   ///< no session argument (C_Initialize, C_GetSlotList, C_OpenSession, ...)
  kSession,  ///< first argument is a session handle
  /// First argument is a session handle and, per PKCS#11 (5.2 "Function return values"), any
  /// error ends the active operation (C_Sign, C_EncryptUpdate, ...). An injected error still
  /// forwards the call, so the real token's operation ends too, as it would on a real failure.
  kEndsOperation,
};

// X(name, kind) for every member of CK_FUNCTION_LIST, in declaration order (the designated
// initialiser that builds our CK_FUNCTION_LIST fails to compile if the order is wrong).
#define HSM_FAULT_PKCS11_FUNCTIONS(X)      \
  X(C_Initialize, kGlobal)                 \
  X(C_Finalize, kGlobal)                   \
  X(C_GetInfo, kGlobal)                    \
  X(C_GetFunctionList, kGlobal)            \
  X(C_GetSlotList, kGlobal)                \
  X(C_GetSlotInfo, kGlobal)                \
  X(C_GetTokenInfo, kGlobal)               \
  X(C_GetMechanismList, kGlobal)           \
  X(C_GetMechanismInfo, kGlobal)           \
  X(C_InitToken, kGlobal)                  \
  X(C_InitPIN, kSession)                   \
  X(C_SetPIN, kSession)                    \
  X(C_OpenSession, kGlobal)                \
  X(C_CloseSession, kSession)              \
  X(C_CloseAllSessions, kGlobal)           \
  X(C_GetSessionInfo, kSession)            \
  X(C_GetOperationState, kSession)         \
  X(C_SetOperationState, kSession)         \
  X(C_Login, kSession)                     \
  X(C_Logout, kSession)                    \
  X(C_CreateObject, kSession)              \
  X(C_CopyObject, kSession)                \
  X(C_DestroyObject, kSession)             \
  X(C_GetObjectSize, kSession)             \
  X(C_GetAttributeValue, kSession)         \
  X(C_SetAttributeValue, kSession)         \
  X(C_FindObjectsInit, kSession)           \
  X(C_FindObjects, kSession)               \
  X(C_FindObjectsFinal, kSession)          \
  X(C_EncryptInit, kSession)               \
  X(C_Encrypt, kEndsOperation)             \
  X(C_EncryptUpdate, kEndsOperation)       \
  X(C_EncryptFinal, kEndsOperation)        \
  X(C_DecryptInit, kSession)               \
  X(C_Decrypt, kEndsOperation)             \
  X(C_DecryptUpdate, kEndsOperation)       \
  X(C_DecryptFinal, kEndsOperation)        \
  X(C_DigestInit, kSession)                \
  X(C_Digest, kEndsOperation)              \
  X(C_DigestUpdate, kEndsOperation)        \
  X(C_DigestKey, kEndsOperation)           \
  X(C_DigestFinal, kEndsOperation)         \
  X(C_SignInit, kSession)                  \
  X(C_Sign, kEndsOperation)                \
  X(C_SignUpdate, kEndsOperation)          \
  X(C_SignFinal, kEndsOperation)           \
  X(C_SignRecoverInit, kSession)           \
  X(C_SignRecover, kEndsOperation)         \
  X(C_VerifyInit, kSession)                \
  X(C_Verify, kEndsOperation)              \
  X(C_VerifyUpdate, kEndsOperation)        \
  X(C_VerifyFinal, kEndsOperation)         \
  X(C_VerifyRecoverInit, kSession)         \
  X(C_VerifyRecover, kEndsOperation)       \
  X(C_DigestEncryptUpdate, kEndsOperation) \
  X(C_DecryptDigestUpdate, kEndsOperation) \
  X(C_SignEncryptUpdate, kEndsOperation)   \
  X(C_DecryptVerifyUpdate, kEndsOperation) \
  X(C_GenerateKey, kSession)               \
  X(C_GenerateKeyPair, kSession)           \
  X(C_WrapKey, kSession)                   \
  X(C_UnwrapKey, kSession)                 \
  X(C_DeriveKey, kSession)                 \
  X(C_SeedRandom, kSession)                \
  X(C_GenerateRandom, kSession)            \
  X(C_GetFunctionStatus, kSession)         \
  X(C_CancelFunction, kSession)            \
  X(C_WaitForSlotEvent, kGlobal)

/// One enumerator per PKCS#11 function, named exactly like the function (they are scoped, so
/// they do not clash with the prototypes in pkcs11.h).
enum class FunctionId : std::size_t {
#define HSM_FAULT_ENUMERATOR(name, kind) name,
  HSM_FAULT_PKCS11_FUNCTIONS(HSM_FAULT_ENUMERATOR)
#undef HSM_FAULT_ENUMERATOR
};

inline constexpr std::array kFunctionNames = {
#define HSM_FAULT_NAME(name, kind) std::string_view{#name},
    HSM_FAULT_PKCS11_FUNCTIONS(HSM_FAULT_NAME)
#undef HSM_FAULT_NAME
};

inline constexpr std::size_t kFunctionCount = kFunctionNames.size();

// Every slot of CK_FUNCTION_LIST after `version` is one function pointer: the list above must
// name all of them (a missing one would be a null entry in the list we hand out).
static_assert(kFunctionCount * sizeof(void*) ==
                  sizeof(CK_FUNCTION_LIST) - offsetof(CK_FUNCTION_LIST, C_Initialize),
              "HSM_FAULT_PKCS11_FUNCTIONS must list every member of CK_FUNCTION_LIST");

inline constexpr std::array<CallKind, kFunctionCount> kFunctionKinds = {
#define HSM_FAULT_KIND(name, kind) CallKind::kind,
    HSM_FAULT_PKCS11_FUNCTIONS(HSM_FAULT_KIND)
#undef HSM_FAULT_KIND
};

[[nodiscard]] constexpr std::size_t index_of(FunctionId id) noexcept {
  return static_cast<std::size_t>(id);
}
[[nodiscard]] constexpr std::string_view name_of(FunctionId id) noexcept {
  return kFunctionNames[index_of(id)];
}
[[nodiscard]] constexpr CallKind kind_of(FunctionId id) noexcept {
  return kFunctionKinds[index_of(id)];
}

/// The function called `name` ("C_Sign"), or nullopt.
[[nodiscard]] constexpr std::optional<FunctionId> find_function(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    if (kFunctionNames[i] == name) {
      return static_cast<FunctionId>(i);
    }
  }
  return std::nullopt;
}

}  // namespace hsm::fault
