// ProviderContext: what one loaded instance of hsm-provider owns (OpenSSL's provctx).
//
// - The hsm::Client per agent socket: one per process, shared by every key and every thread
//   (hsm::Client is thread-safe and pipelines concurrent calls), created on first use.
// - A private OpenSSL library context holding only the default provider, for the work done
//   locally: decoding the agent's SPKI, hashing for digest-sign, verification and the
//   AlgorithmIdentifier of a signature. Private, so that nothing done here can fetch this
//   provider's own algorithms again (no recursion), whatever the application's configuration.
// - Raising OpenSSL errors through the core (ERR_print_errors shows them as the provider's).
//
// Thread-safety: every member function may be called from any thread.
// Fork: an application that forks after loading a key (nginx's master) must not use the parent's
// connections in the child; a child notices the new pid and opens its own (the parent's Client
// objects are left alone in the child: their threads do not exist there).
#pragma once

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/types.h>
#include <sys/types.h>

#include <chrono>
#include <cstdarg>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace hsm {
class Client;
class Error;
}  // namespace hsm

namespace hsm::provider {

/// Reason codes of the errors this provider raises (reason strings in provider.cpp).
enum Reason : int {
  kReasonAgent = 1,     // the agent answered with an error (its code and message follow)
  kReasonUnreachable,   // no connection to the agent's socket
  kReasonBadUri,        // a URI this provider cannot parse
  kReasonNotSupported,  // an operation or parameter hsm keys do not do
  kReasonNoPrivateKey,  // a public-only key used to sign
  kReasonInternal,      // OpenSSL failed locally
};

class ProviderContext {
 public:
  ProviderContext(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in);
  ~ProviderContext();
  ProviderContext(const ProviderContext&) = delete;
  ProviderContext& operator=(const ProviderContext&) = delete;

  /// The client for `socket_path` ("" = the default: openssl.cnf's socket, else
  /// hsm::default_socket_path()). Never null.
  [[nodiscard]] std::shared_ptr<hsm::Client> client(const std::string& socket_path);
  /// The socket a key with no ?socket= uses.
  [[nodiscard]] const std::string& default_socket() const noexcept { return default_socket_; }

  /// The private library context (default provider only).
  [[nodiscard]] OSSL_LIB_CTX* libctx() const noexcept { return libctx_; }

  /// Raises an OpenSSL error with `reason` and a printf-style message.
  void raise(int reason, const char* format, ...) const __attribute__((format(printf, 3, 4)));
  /// Raises the error of a failed agent call: unreachable (naming the socket) or the agent's
  /// code and message, after `what` ("sign with key 'k'").
  void raise_agent_error(const hsm::Error& error, const std::string& what,
                         const std::string& socket_path) const;

 private:
  const OSSL_CORE_HANDLE* handle_;
  OSSL_FUNC_core_new_error_fn* new_error_ = nullptr;
  OSSL_FUNC_core_set_error_debug_fn* set_error_debug_ = nullptr;
  OSSL_FUNC_core_vset_error_fn* vset_error_ = nullptr;
  OSSL_LIB_CTX* libctx_ = nullptr;
  std::string default_socket_;
  std::chrono::milliseconds timeout_{5000};

  std::mutex mutex_;
  pid_t pid_;                                                    // guarded by mutex_
  std::map<std::string, std::shared_ptr<hsm::Client>> clients_;  // guarded by mutex_
};

}  // namespace hsm::provider
