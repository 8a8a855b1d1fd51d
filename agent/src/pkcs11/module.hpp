// Library: one dlopen'ed PKCS#11 library and its function list, loaded once and kept for the
// agent's life. Module: one initialisation of that library (C_Initialize .. C_Finalize), and the
// ONE call wrapper through which every PKCS#11 call of the agent goes.
//
// They are two classes because re-initialising after a token fault (docs/reliability.md) is
// C_Finalize + C_Initialize on the same library: a new Module over the same Library. Unloading
// and reloading a vendor library on every fault is a source of bugs of its own (libraries that
// leak or crash on dlclose), and buys nothing.
//
// Ownership: Library owns the dlopen handle (closed by a unique_ptr deleter); each Module shares
// it. Module owns the initialisation (C_Finalize in the destructor, unless another user in this
// process initialised it first). Everything that holds a session or an object handle (Token,
// SessionPool, KeyStore) must be destroyed before the Module.
//
// Thread-safety: the library is initialised with CKF_OS_LOCKING_OK, so call() may be used from
// any thread; the caller keeps each session to one thread at a time (SessionPool does). A Module
// must be destroyed only when no thread is inside one of its calls: C_Finalize while another
// thread is in the library is undefined behaviour (PKCS#11 2.40 section 5.4). TokenState
// guarantees that (service/token_state.hpp).
#pragma once

#include <dlfcn.h>
#include <p11-kit/pkcs11.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>

#include "pkcs11/error.hpp"
#include "pkcs11/object_change_gate.hpp"
#include "pkcs11/stats.hpp"

namespace prometheus {
class Counter;
class Histogram;
}  // namespace prometheus

namespace hsm::agent::pkcs11 {

/// What a PKCS#11 function does to token objects, for ObjectChangeGate: kNone (slot, session
/// and mechanism calls), kReads (finds, attribute reads, sign and verify with a key) or
/// kChanges (creates or destroys objects).
enum class ObjectAccess : std::uint8_t { kNone, kReads, kChanges };

// The PKCS#11 functions the agent calls: (member of CK_FUNCTION_LIST, enumerator, what it does
// to token objects). One list drives the enum, the metric label, the member lookup and the
// gate, so a new call is one line here.
#define HSM_PKCS11_FUNCTIONS(X)                      \
  X(C_Initialize, kInitialize, kNone)                \
  X(C_Finalize, kFinalize, kNone)                    \
  X(C_GetSlotList, kGetSlotList, kNone)              \
  X(C_GetTokenInfo, kGetTokenInfo, kNone)            \
  X(C_GetMechanismList, kGetMechanismList, kNone)    \
  X(C_GetMechanismInfo, kGetMechanismInfo, kNone)    \
  X(C_OpenSession, kOpenSession, kNone)              \
  X(C_CloseSession, kCloseSession, kNone)            \
  X(C_GetSessionInfo, kGetSessionInfo, kNone)        \
  X(C_Login, kLogin, kNone)                          \
  X(C_Logout, kLogout, kNone)                        \
  X(C_FindObjectsInit, kFindObjectsInit, kReads)     \
  X(C_FindObjects, kFindObjects, kReads)             \
  X(C_FindObjectsFinal, kFindObjectsFinal, kReads)   \
  X(C_GetAttributeValue, kGetAttributeValue, kReads) \
  X(C_GenerateKeyPair, kGenerateKeyPair, kChanges)   \
  X(C_DestroyObject, kDestroyObject, kChanges)       \
  X(C_SignInit, kSignInit, kReads)                   \
  X(C_Sign, kSign, kReads)                           \
  X(C_VerifyInit, kVerifyInit, kReads)               \
  X(C_Verify, kVerify, kReads)

enum class Function : std::uint8_t {
#define HSM_PKCS11_ENUM(member, enumerator, access) enumerator,
  HSM_PKCS11_FUNCTIONS(HSM_PKCS11_ENUM)
#undef HSM_PKCS11_ENUM
};

inline constexpr std::size_t kFunctionCount = 0
#define HSM_PKCS11_COUNT(member, enumerator, access) +1
    HSM_PKCS11_FUNCTIONS(HSM_PKCS11_COUNT)
#undef HSM_PKCS11_COUNT
    ;

/// The functions every signature calls: their latency is a histogram
/// (pkcs11_call_duration_seconds) by default; every function's calls are counted
/// (pkcs11_calls_total) and its errors too. docs/metrics.md, "Series budget".
inline constexpr std::array<Function, 2> kTimedFunctions = {Function::kSignInit, Function::kSign};

/// "C_Sign": the PKCS#11 name, used in errors and as the metric label (a bounded set).
[[nodiscard]] std::string_view function_name(Function function) noexcept;

template <Function F>
struct FunctionTraits;
#define HSM_PKCS11_TRAITS(member, enumerator, access)                   \
  template <>                                                           \
  struct FunctionTraits<Function::enumerator> {                         \
    static constexpr auto kMember = &CK_FUNCTION_LIST::member;          \
    static constexpr ObjectAccess kObjectAccess = ObjectAccess::access; \
  };
HSM_PKCS11_FUNCTIONS(HSM_PKCS11_TRAITS)
#undef HSM_PKCS11_TRAITS

class Library {
 public:
  /// dlopen()s `path` and resolves C_GetFunctionList and the function list. Calls nothing else.
  /// Throws StartupError naming the path.
  explicit Library(std::string path);
  Library(const Library&) = delete;
  Library& operator=(const Library&) = delete;

  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] CK_FUNCTION_LIST_PTR functions() const noexcept { return functions_; }

 private:
  struct LibraryCloser {
    void operator()(void* handle) const noexcept { ::dlclose(handle); }
  };

  std::string path_;
  std::unique_ptr<void, LibraryCloser> handle_;
  CK_FUNCTION_LIST_PTR functions_ = nullptr;
};

class Module {
 public:
  /// C_Initialize on `library` with CKF_OS_LOCKING_OK. CKR_CRYPTOKI_ALREADY_INITIALIZED (another
  /// user in this process) is accepted, and then this Module does not C_Finalize. Throws
  /// Pkcs11Error (counted in pkcs11_errors_total like any failed call). `stats` must outlive
  /// the Module.
  Module(std::shared_ptr<const Library> library, Pkcs11Stats& stats);
  /// C_Finalize (see the class comment for when that is allowed). Never throws.
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;
  Module(Module&&) = delete;
  Module& operator=(Module&&) = delete;

  /// Calls PKCS#11 function F with `args`; throws Pkcs11Error unless it returns CKR_OK.
  template <Function F, typename... Args>
  void call(Args... args) const {
    const CK_RV rv = invoke<F>(args...);
    if (rv != CKR_OK) fail(F, rv);
  }

  /// As call(), but the values in `accepted` are returned instead of thrown (and are not
  /// counted as errors): e.g. CKR_USER_ALREADY_LOGGED_IN from C_Login, CKR_SIGNATURE_INVALID
  /// from C_Verify. Returns CKR_OK or one of `accepted`.
  template <Function F, typename... Args>
  [[nodiscard]] CK_RV call_accepting(std::initializer_list<CK_RV> accepted, Args... args) const {
    const CK_RV rv = invoke<F>(args...);
    if (rv == CKR_OK) return rv;
    for (const CK_RV ok : accepted) {
      if (rv == ok) return rv;
    }
    fail(F, rv);
  }

  /// Keeps calls that create or destroy token objects apart from those that read them
  /// (ObjectChangeGate), for a library that is not safe there (SoftHSMv2). Off by default.
  /// Only before the Module is used from more than one thread: the setting is not synchronised.
  void serialize_object_changes(bool on) noexcept { serialize_object_changes_ = on; }
  [[nodiscard]] bool serializes_object_changes() const noexcept {
    return serialize_object_changes_;
  }

  [[nodiscard]] const std::string& path() const noexcept { return library_->path(); }
  /// What this module's calls, and the Token and SessionPool over it, record.
  [[nodiscard]] Pkcs11Stats& stats() const noexcept { return stats_; }

 private:
  // The single place a PKCS#11 function is entered: counts the call in
  // pkcs11_calls_total{function} and times it into pkcs11_call_duration_seconds{function} when
  // the function has a histogram. Counting errors and throwing happen in fail().
  // When object changes are serialised, the call runs under the gate; the time it waited there
  // is the agent's, not the token's, and is not in the histogram.
  template <Function F, typename... Args>
  [[nodiscard]] CK_RV invoke(Args... args) const {
    constexpr ObjectAccess kAccess = FunctionTraits<F>::kObjectAccess;
    if constexpr (kAccess == ObjectAccess::kChanges) {
      if (serialize_object_changes_) {
        const auto alone = gate_.change();
        return timed<F>(args...);
      }
    } else if constexpr (kAccess == ObjectAccess::kReads) {
      if (serialize_object_changes_) {
        const auto shared = gate_.read();
        return timed<F>(args...);
      }
    }
    return timed<F>(args...);
  }
  template <Function F, typename... Args>
  [[nodiscard]] CK_RV timed(Args... args) const {
    const auto start = std::chrono::steady_clock::now();
    const CK_RV rv = (functions_->*FunctionTraits<F>::kMember)(args...);
    observe(F, std::chrono::steady_clock::now() - start);
    return rv;
  }
  void observe(Function function, std::chrono::steady_clock::duration elapsed) const noexcept;
  /// Counts pkcs11_errors_total{function,ckr} and throws Pkcs11Error.
  [[noreturn]] void fail(Function function, CK_RV rv) const;

  std::shared_ptr<const Library> library_;
  Pkcs11Stats& stats_;
  CK_FUNCTION_LIST_PTR functions_ = nullptr;
  bool finalize_on_destruction_ = false;
  bool serialize_object_changes_ = false;
  mutable ObjectChangeGate gate_;
  // Cached, one per function; a duration is nullptr for a function without a histogram.
  std::array<prometheus::Counter*, kFunctionCount> calls_{};
  std::array<prometheus::Histogram*, kFunctionCount> durations_{};
};

}  // namespace hsm::agent::pkcs11
