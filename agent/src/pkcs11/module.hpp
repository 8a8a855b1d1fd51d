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
#include "pkcs11/stats.hpp"

namespace prometheus {
class Counter;
class Histogram;
}  // namespace prometheus

namespace hsm::agent::pkcs11 {

// The PKCS#11 functions the agent calls: (member of CK_FUNCTION_LIST, enumerator). One list
// drives the enum, the metric label and the member lookup, so a new call is one line here.
#define HSM_PKCS11_FUNCTIONS(X)              \
  X(C_Initialize, kInitialize)               \
  X(C_Finalize, kFinalize)                   \
  X(C_GetSlotList, kGetSlotList)             \
  X(C_GetTokenInfo, kGetTokenInfo)           \
  X(C_GetMechanismList, kGetMechanismList)   \
  X(C_GetMechanismInfo, kGetMechanismInfo)   \
  X(C_OpenSession, kOpenSession)             \
  X(C_CloseSession, kCloseSession)           \
  X(C_GetSessionInfo, kGetSessionInfo)       \
  X(C_Login, kLogin)                         \
  X(C_Logout, kLogout)                       \
  X(C_FindObjectsInit, kFindObjectsInit)     \
  X(C_FindObjects, kFindObjects)             \
  X(C_FindObjectsFinal, kFindObjectsFinal)   \
  X(C_GetAttributeValue, kGetAttributeValue) \
  X(C_GenerateKeyPair, kGenerateKeyPair)     \
  X(C_DestroyObject, kDestroyObject)         \
  X(C_SignInit, kSignInit)                   \
  X(C_Sign, kSign)                           \
  X(C_VerifyInit, kVerifyInit)               \
  X(C_Verify, kVerify)

enum class Function : std::uint8_t {
#define HSM_PKCS11_ENUM(member, enumerator) enumerator,
  HSM_PKCS11_FUNCTIONS(HSM_PKCS11_ENUM)
#undef HSM_PKCS11_ENUM
};

inline constexpr std::size_t kFunctionCount = 0
#define HSM_PKCS11_COUNT(member, enumerator) +1
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
#define HSM_PKCS11_TRAITS(member, enumerator)                  \
  template <>                                                  \
  struct FunctionTraits<Function::enumerator> {                \
    static constexpr auto kMember = &CK_FUNCTION_LIST::member; \
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

  [[nodiscard]] const std::string& path() const noexcept { return library_->path(); }
  /// What this module's calls, and the Token and SessionPool over it, record.
  [[nodiscard]] Pkcs11Stats& stats() const noexcept { return stats_; }

 private:
  // The single place a PKCS#11 function is entered: counts the call in
  // pkcs11_calls_total{function} and times it into pkcs11_call_duration_seconds{function} when
  // the function has a histogram. Counting errors and throwing happen in fail().
  template <Function F, typename... Args>
  [[nodiscard]] CK_RV invoke(Args... args) const {
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
  // Cached, one per function; a duration is nullptr for a function without a histogram.
  std::array<prometheus::Counter*, kFunctionCount> calls_{};
  std::array<prometheus::Histogram*, kFunctionCount> durations_{};
};

}  // namespace hsm::agent::pkcs11
