// hsm::Client: the library application containers link to sign with keys held by hsm-agent.
//
//   #include <hsm/client.hpp>
//   hsm::Client client{"/run/hsm-agent/agent.sock"};
//   auto sig = client.sign("jwt-key", payload);  // JOSE r||s for ES256
//
// Thread-safety: every member function is safe to call from many threads at once. Concurrent
// calls share a small pool of pipelined connections (ClientOptions::connections, default 1);
// requests are matched to answers by msgid, so one slow call does not hold up the others.
//
// Per-call control: every call (synchronous, future and callback forms) takes a CallOptions
// last: its own timeout or deadline (default: now + ClientOptions::timeout) and a
// std::stop_token. A call whose stop is requested completes at once with Errc::kCancelled; a
// call whose deadline passes completes with Errc::kTimeout. Either way its answer, if one comes
// later, is dropped, and nothing of it stays behind in the client.
//
// Blocking: every synchronous call blocks the calling thread until the answer arrives, the
// call's deadline passes or it is cancelled; never longer. Asynchronous calls (`*_async`) never
// block on the agent: they encode and write the request (a write into the socket buffer,
// bounded by the deadline) and return.
//
// Errors: every failure is reported as hsm::Error, whose errc() is an hsm::Errc: the protocol's
// error codes (kNotFound, kHsmUnavailable, ...) and the client-side ones (kConnectionFailed,
// kTimeout, kCancelled, kProtocolError; kInvalidParams for a request rejected before it was
// sent). code() keeps the same code as a string ("not_found") for logs. Synchronous calls throw
// it; futures rethrow it from get(); callbacks receive it in their Outcome.
//
// Resilience: connections open lazily (the first call connects) and are reopened on demand
// after the agent goes away, with capped exponential backoff and jitter between attempts
// (ClientOptions::retry). Idempotent calls (sign, verify, get_public_key, list_keys, get_jwks,
// health, capabilities) are retried within their deadline when the connection is lost or the
// agent answers hsm_unavailable, overloaded, shutting_down or audit_unavailable (its audit log
// cannot be written for now: it refuses key operations). generate_key and delete_key are
// retried only when the request certainly never left this process (the connect failed, or the
// connection was found dead before a byte was written). A connection that died while idle (an
// agent restart) is replaced by the next call at once, without counting as a retry. Other
// agent errors (not_found, invalid_params, hsm_error, deadline_exceeded, ...), timeouts and
// cancellations are never retried.
//
// Cost: a Client owns threads and sockets. Make one per process (or per agent) and share it;
// do not make one per request.
//
// Threads: a Client owns one reader thread per open connection, which reads the answers on it,
// and one timer thread (deadlines, retries; started by the first call). A synchronous caller
// that finds nobody reading its connection reads there itself until its own answer is in
// (answers of other calls it meets on the way go to their owners), so a lone synchronous caller
// is answered without any thread being woken. Callbacks run on a client thread, never on a
// thread that made a call or requested a stop: on the reader thread of the connection that
// carried the answer, or on the timer thread (timeouts, cancellations, failures found before
// sending, answers a synchronous caller read). A callback must not block (it holds up every answer
// on its connection), must not call synchronous methods of the same Client, and must not destroy
// the Client; it may start asynchronous calls. Exceptions thrown by a callback are caught and
// dropped.
//
// Destruction: ~Client closes the connections and completes every call still pending with
// connection_failed ("client closed") before it returns; callbacks still pending run then,
// possibly on the destroying thread.
#pragma once

#if __cplusplus < 202002L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 202002L)
#error "hsm/client.hpp requires C++20 or later: compile with -std=c++20 (CMake: cxx_std_20)"
#endif

#include <chrono>
#include <concepts>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace hsm {

using Bytes = std::vector<std::uint8_t>;
using Jwk = std::map<std::string, std::string>;

/// Every error code an hsm::Error can carry, typed. The protocol's codes come first, in the
/// order of protocol/README.md; then the codes of this side of the socket and of hsm::jose.
enum class Errc : std::uint8_t {
  // The agent's answers (protocol codes).
  kInvalidRequest,    // "invalid_request": a message of the wrong shape
  kUnknownMethod,     // "unknown_method"
  kInvalidParams,     // "invalid_params": also a request this client refused to send
  kNotFound,          // "not_found": no key with that kid
  kAlreadyExists,     // "already_exists": generate_key on a kid in use
  kUnsupportedAlg,    // "unsupported_alg"
  kNotSupported,      // "not_supported": the agent was started without that permission
  kPermissionDenied,  // "permission_denied"
  kHsmUnavailable,    // "hsm_unavailable": session or token gone (retried)
  kHsmError,          // "hsm_error": any other PKCS#11 failure (see Error::ckr())
  kOverloaded,        // "overloaded" (retried)
  kShuttingDown,      // "shutting_down" (retried)
  kDeadlineExceeded,  // "deadline_exceeded": the agent gave up at the call's timeout_ms
  kAuditUnavailable,  // "audit_unavailable": the audit log cannot be written (retried)
  kInternal,          // "internal"
  // This side of the socket.
  kConnectionFailed,  // "connection_failed": cannot connect, or the connection was lost
  kTimeout,           // "timeout": the call's deadline passed
  kCancelled,         // "cancelled": the call's stop_token was stopped
  kProtocolError,     // "protocol_error": the agent's answer broke the protocol
  // hsm::jose (see jose.hpp).
  kJoseMalformed,       // "jose_malformed"
  kJoseTooLarge,        // "jose_too_large"
  kJoseUnsupportedAlg,  // "jose_unsupported_alg"
  kJoseAlgMismatch,     // "jose_alg_mismatch"
  kJoseKidMismatch,     // "jose_kid_mismatch"
  kJoseBadKey,          // "jose_bad_key"
  kJoseBadSignature,    // "jose_bad_signature"
  /// A code this version does not know (from a newer agent); Error::code() has its name.
  kUnknown,
};

/// The code's name, as Error::code() spells it ("not_found"); "unknown" for kUnknown.
[[nodiscard]] std::string_view to_string(Errc code) noexcept;
/// The Errc of a code's name; kUnknown for a name not listed above.
[[nodiscard]] Errc errc_from_string(std::string_view name) noexcept;

/// Client-side error codes as strings (the names of kConnectionFailed, ...), for code that
/// compares code(); errc() is the typed form.
inline constexpr std::string_view kConnectionFailed = "connection_failed";
inline constexpr std::string_view kTimeout = "timeout";
inline constexpr std::string_view kProtocolError = "protocol_error";
inline constexpr std::string_view kCancelled = "cancelled";
/// A request this client refused to send (bad option, larger than the agent's limit). Same
/// spelling as the protocol code the agent would have answered with.
inline constexpr std::string_view kInvalidParams = "invalid_params";

class Error : public std::runtime_error {
 public:
  /// what() reads "code: message" (plus " (CKR_...)" when there is a ckr).
  Error(std::string code, const std::string& message, std::optional<std::string> ckr = {});
  Error(Errc code, const std::string& message, std::optional<std::string> ckr = {});
  /// The typed code; kUnknown for a code this version does not know (code() has it).
  [[nodiscard]] Errc errc() const noexcept { return errc_; }
  /// The code as a string ("not_found", ...), for logs.
  [[nodiscard]] const std::string& code() const noexcept { return code_; }
  /// The message alone, without the code.
  [[nodiscard]] const std::string& message() const noexcept { return message_; }
  /// The PKCS#11 return value's name ("CKR_DEVICE_ERROR") when a PKCS#11 call failed.
  [[nodiscard]] const std::optional<std::string>& ckr() const noexcept { return ckr_; }

 private:
  std::string code_;
  std::string message_;
  std::optional<std::string> ckr_;
  Errc errc_;
};

/// The socket path from HSM_AGENT_SOCKET, else the agent's default path.
[[nodiscard]] std::string default_socket_path();

/// How failed calls are retried and how a lost connection is reopened. Delays grow as
/// initial_backoff * 2^(n-1), capped at max_backoff; each one is drawn uniformly from
/// [delay/2, delay] (jitter) so that many clients do not reconnect in lockstep. A call is never
/// retried past its deadline: when the next attempt would start after it, the call fails with
/// the last error.
struct RetryPolicy {
  /// Attempts per call, the first included; 1 disables retries (the connection is still
  /// reopened on demand by the next call).
  std::uint32_t max_attempts = 16;
  std::chrono::milliseconds initial_backoff{10};
  std::chrono::milliseconds max_backoff{1000};
};

struct ClientOptions {
  std::string socket_path = default_socket_path();
  /// Per call: the deadline is the start of the call plus this; retries happen within it. The
  /// time left is also sent with each request (timeout_ms) so that the agent drops work nobody
  /// waits for any more.
  std::chrono::milliseconds timeout{5000};
  /// Connections in the pool (0 counts as 1); calls are spread over them round-robin, each
  /// connection pipelined. One is enough for most applications; a second spreads the work of
  /// reading and writing over two threads on both sides, which a busy multi-threaded caller on
  /// a multi-core machine can use.
  std::size_t connections = 1;
  RetryPolicy retry;
  /// Largest request this client sends (bigger ones fail with invalid_params before they are
  /// written, because the agent would close the connection and fail every call on it). Keep
  /// it at the agent's --max-message-bytes.
  std::size_t max_request_bytes = std::size_t{1024} * 1024;
  /// Largest response accepted; a bigger one closes the connection with protocol_error.
  std::size_t max_response_bytes = std::size_t{16} * 1024 * 1024;
  /// Latency mode (docs/performance.md, "Latency mode"): a synchronous call that reads its own
  /// answer polls the socket for up to this long before it blocks, which saves the kernel's
  /// wake-up of the caller (tens of microseconds on many machines) at the price of the CPU
  /// spent polling. Adaptive: while recent answers took longer than this on average, calls do
  /// not poll at all. At most kMaxBusyPoll; 0 never polls. Unset: the environment variable
  /// HSM_CLIENT_BUSY_POLL_US (which the Helm chart sets from client.busyPollMicros), else 0.
  /// The constructor refuses a value out of range with invalid_params. Worth it on dedicated
  /// cores with a fast local token, next to an agent started with --busy-poll-us; not on shared
  /// or CPU-limited nodes.
  std::optional<std::chrono::microseconds> busy_poll;
  static constexpr std::chrono::microseconds kMaxBusyPoll{1000};
};

struct Capabilities {
  std::uint32_t protocol = 0;
  std::string agent_version;
  bool can_create = false;
  bool can_import = false;
  bool can_delete = false;
  std::vector<std::string> supported_algs;
  std::string default_alg;
  std::uint64_t max_message_bytes = 0;
  /// Where the agent serves its Prometheus metrics (http://HOST:PORT/metrics, reachable from the
  /// agent's host or pod); nullopt when it serves none or is too old to say.
  std::optional<std::string> metrics_url;
};

struct TokenInfo {
  std::string label, manufacturer, model, serial;
};

struct Health {
  bool ok = false;
  double latency_ms = 0;
  std::optional<std::string> error;
  TokenInfo token;
};

struct KeyInfo {
  std::string kid;
  std::string alg;
  Jwk jwk;
};

struct PublicKey {
  std::string kid;
  std::string alg;
  Jwk jwk;
  Bytes spki;  // DER SubjectPublicKeyInfo
};

struct Signature {
  std::string kid;
  std::string alg;
  Bytes signature;
};

/// Options of one sign or verify call.
struct SignOptions {
  std::optional<std::string> alg;     // default: the key's alg
  std::optional<std::string> format;  // "raw" (JOSE, default) or "der" (ECDSA only)
};

/// Options of one call, any form (synchronous, future, callback); the last parameter of each.
///
///   std::stop_source stop;
///   auto sig = client.sign("k", data, {.timeout = std::chrono::milliseconds(200),
///                                      .stop = stop.get_token()});
struct CallOptions {
  /// Time allowed for this call, retries included (default: ClientOptions::timeout). The time
  /// left is sent to the agent with each attempt (timeout_ms).
  std::optional<std::chrono::milliseconds> timeout;
  /// An absolute deadline instead; with both, the earlier one counts.
  std::optional<std::chrono::steady_clock::time_point> deadline;
  /// Stopping it completes the call at once with Errc::kCancelled (a callback then runs on a
  /// client thread, not on the one requesting the stop); the answer, if one comes later, is
  /// dropped. A stop requested before the call starts cancels it before anything is sent. It
  /// does not undo what the agent already did (a generate_key may still create the key).
  std::stop_token stop;
};

/// A JSON value type that serialises itself with dump(): nlohmann::json, which sign_jwt accepts
/// as claims without this header depending on it.
template <class T>
concept JsonValue = requires(const T& value) {
  { value.dump() } -> std::convertible_to<std::string>;
};

/// The result of an asynchronous call handed to a callback: a value or an hsm::Error.
template <class T>
class Outcome {
 public:
  Outcome(T value) : state_(std::in_place_index<0>, std::move(value)) {}      // NOLINT: implicit
  Outcome(Error error) : state_(std::in_place_index<1>, std::move(error)) {}  // NOLINT: implicit

  [[nodiscard]] bool ok() const noexcept { return state_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  /// The value; throws the hsm::Error when the call failed.
  [[nodiscard]] T& value() & {
    check();
    return std::get<0>(state_);
  }
  [[nodiscard]] const T& value() const& {
    check();
    return std::get<0>(state_);
  }
  [[nodiscard]] T&& value() && {
    check();
    return std::get<0>(std::move(state_));
  }

  /// The error; throws std::logic_error when the call succeeded.
  [[nodiscard]] const Error& error() const {
    if (ok()) {
      throw std::logic_error("hsm::Outcome::error() called on a success");
    }
    return std::get<1>(state_);
  }

 private:
  void check() const {
    if (!ok()) {
      throw std::get<1>(state_);
    }
  }
  std::variant<T, Error> state_;
};

/// Called exactly once per asynchronous call, on a client thread (see the top of this file).
template <class T>
using Callback = std::function<void(Outcome<T>)>;

class Client {
 public:
  /// Connects lazily: the first call opens the connection. Does not block.
  explicit Client(std::string socket_path);
  /// Throws Error(invalid_params) for options out of range (busy_poll).
  explicit Client(ClientOptions options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  /// A moved-from Client may only be destroyed or assigned to; its calls throw
  /// std::logic_error.
  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;

  [[nodiscard]] const ClientOptions& options() const;

  // ---- Synchronous calls: block until the answer, the deadline or a stop; throw hsm::Error.

  [[nodiscard]] Capabilities capabilities(const CallOptions& call = {});
  [[nodiscard]] Health health(const CallOptions& call = {});
  /// Generates a key pair inside the token. `rsa_bits` applies to RSA algs only.
  KeyInfo generate_key(std::string_view kid, std::optional<std::string> alg = {},
                       std::optional<std::uint32_t> rsa_bits = {}, const CallOptions& call = {});
  /// The key's public key, creating the key first (with `alg`, the agent's default when
  /// empty) only when there is none. Safe against a concurrent creator: whoever loses the race
  /// reads the winner's key. A key that exists with another alg is not replaced: it throws
  /// Errc::kAlreadyExists. One deadline (`call`) covers the up to three calls it makes.
  PublicKey ensure_key(std::string_view kid, std::optional<std::string> alg = {},
                       const CallOptions& call = {});

  /// Signs `data` (hashed by the agent as the alg requires). Returns the signature bytes.
  [[nodiscard]] Bytes sign(std::string_view kid, std::span<const std::uint8_t> data,
                           const CallOptions& call = {});
  [[nodiscard]] Bytes sign(std::string_view kid, std::string_view data,
                           const CallOptions& call = {});
  /// Signs a digest the caller computed (its length must match the alg's hash).
  [[nodiscard]] Bytes sign_digest(std::string_view kid, std::span<const std::uint8_t> digest,
                                  const CallOptions& call = {});
  /// The full form: kid and alg of the answer too, with options.
  [[nodiscard]] Signature sign_detailed(std::string_view kid, std::span<const std::uint8_t> data,
                                        const SignOptions& options = {},
                                        const CallOptions& call = {});
  [[nodiscard]] Signature sign_digest_detailed(std::string_view kid,
                                               std::span<const std::uint8_t> digest,
                                               const SignOptions& options = {},
                                               const CallOptions& call = {});

  /// True when `signature` is valid for `data`; false when it is not (not an exception).
  [[nodiscard]] bool verify(std::string_view kid, std::span<const std::uint8_t> data,
                            std::span<const std::uint8_t> signature,
                            const SignOptions& options = {}, const CallOptions& call = {});
  [[nodiscard]] bool verify(std::string_view kid, std::string_view data,
                            std::span<const std::uint8_t> signature, const CallOptions& call = {});
  [[nodiscard]] bool verify_digest(std::string_view kid, std::span<const std::uint8_t> digest,
                                   std::span<const std::uint8_t> signature,
                                   const SignOptions& options = {}, const CallOptions& call = {});

  [[nodiscard]] PublicKey get_public_key(std::string_view kid, const CallOptions& call = {});
  [[nodiscard]] std::vector<KeyInfo> list_keys(const CallOptions& call = {});
  /// Every public key as JWKs (the "keys" of a JWKS document).
  [[nodiscard]] std::vector<Jwk> get_jwks(const CallOptions& call = {});
  /// True when a key was deleted, false when there was no such key.
  bool delete_key(std::string_view kid, const CallOptions& call = {});

  // ---- Asynchronous calls: the future form returns at once (the future rethrows
  // hsm::Error from get()); the callback form calls `done` exactly once, on a client thread.
  // Arguments are copied before the call returns. An argument rejected before anything starts
  // (an unknown SignOptions::format) throws hsm::Error(invalid_params) from the call itself,
  // in the synchronous and asynchronous forms alike. ----------------------------------------

  [[nodiscard]] std::future<Capabilities> capabilities_async(const CallOptions& call = {});
  void capabilities_async(Callback<Capabilities> done, const CallOptions& call = {});
  [[nodiscard]] std::future<Health> health_async(const CallOptions& call = {});
  void health_async(Callback<Health> done, const CallOptions& call = {});
  [[nodiscard]] std::future<KeyInfo> generate_key_async(std::string_view kid,
                                                        std::optional<std::string> alg = {},
                                                        std::optional<std::uint32_t> rsa_bits = {},
                                                        const CallOptions& call = {});
  void generate_key_async(std::string_view kid, std::optional<std::string> alg,
                          std::optional<std::uint32_t> rsa_bits, Callback<KeyInfo> done,
                          const CallOptions& call = {});

  [[nodiscard]] std::future<Signature> sign_async(std::string_view kid,
                                                  std::span<const std::uint8_t> data,
                                                  const SignOptions& options = {},
                                                  const CallOptions& call = {});
  void sign_async(std::string_view kid, std::span<const std::uint8_t> data,
                  Callback<Signature> done, const SignOptions& options = {},
                  const CallOptions& call = {});
  [[nodiscard]] std::future<Signature> sign_digest_async(std::string_view kid,
                                                         std::span<const std::uint8_t> digest,
                                                         const SignOptions& options = {},
                                                         const CallOptions& call = {});
  void sign_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                         Callback<Signature> done, const SignOptions& options = {},
                         const CallOptions& call = {});

  [[nodiscard]] std::future<bool> verify_async(std::string_view kid,
                                               std::span<const std::uint8_t> data,
                                               std::span<const std::uint8_t> signature,
                                               const SignOptions& options = {},
                                               const CallOptions& call = {});
  void verify_async(std::string_view kid, std::span<const std::uint8_t> data,
                    std::span<const std::uint8_t> signature, Callback<bool> done,
                    const SignOptions& options = {}, const CallOptions& call = {});
  [[nodiscard]] std::future<bool> verify_digest_async(std::string_view kid,
                                                      std::span<const std::uint8_t> digest,
                                                      std::span<const std::uint8_t> signature,
                                                      const SignOptions& options = {},
                                                      const CallOptions& call = {});
  void verify_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                           std::span<const std::uint8_t> signature, Callback<bool> done,
                           const SignOptions& options = {}, const CallOptions& call = {});

  [[nodiscard]] std::future<PublicKey> get_public_key_async(std::string_view kid,
                                                            const CallOptions& call = {});
  void get_public_key_async(std::string_view kid, Callback<PublicKey> done,
                            const CallOptions& call = {});
  [[nodiscard]] std::future<std::vector<KeyInfo>> list_keys_async(const CallOptions& call = {});
  void list_keys_async(Callback<std::vector<KeyInfo>> done, const CallOptions& call = {});
  [[nodiscard]] std::future<std::vector<Jwk>> get_jwks_async(const CallOptions& call = {});
  void get_jwks_async(Callback<std::vector<Jwk>> done, const CallOptions& call = {});
  [[nodiscard]] std::future<bool> delete_key_async(std::string_view kid,
                                                   const CallOptions& call = {});
  void delete_key_async(std::string_view kid, Callback<bool> done, const CallOptions& call = {});

  // ---- JOSE: compact JWS / JWT signed in the HSM (verification: hsm/jose.hpp, offline). ----
  // The header's "alg" is the caller's when `header_json` has one (any alg the key can do: an
  // RSA key signs RS256/384/512 and PS256/384/512; the agent refuses others with
  // unsupported_alg), else the key's alg, looked up once per kid (get_public_key) and cached for
  // the Client's lifetime; when the agent refuses a cached alg (the key was replaced by one of
  // another type) the entry is refreshed and the sign made once more. "kid" is the key id; a
  // caller's "kid" must equal it. Both are placed first in the header.
  // Blocking and retries are those of sign(); `call` covers the look-up and the sign together.
  // Throws hsm::Error for the agent's errors and hsm::jose::Error (an hsm::Error, codes
  // "jose_*") for a bad header or claims (kMalformed, kUnsupportedAlg, kKidMismatch,
  // kTooLarge). Header and payload are each bounded by ClientOptions::max_request_bytes.

  /// A compact JWS (RFC 7515): `header_json` is a JSON object ("" or "{}" for none); the
  /// payload is signed as given (base64url-encoded).
  [[nodiscard]] std::string sign_jws(std::string_view kid, std::string_view header_json,
                                     std::span<const std::uint8_t> payload,
                                     const CallOptions& call = {});
  [[nodiscard]] std::string sign_jws(std::string_view kid, std::string_view header_json,
                                     std::string_view payload, const CallOptions& call = {});
  /// A JWT (RFC 7519): payload `claims_json` (a JSON object, re-serialised compactly;
  /// jose::Error kMalformed otherwise), header {"alg", "kid", "typ": "JWT"} plus `header_json`'s
  /// members (e.g. R"({"alg":"PS256"})" for an RSA key). Claims are the caller's: set "exp",
  /// "iat", "iss" and so on yourself.
  [[nodiscard]] std::string sign_jwt(std::string_view kid, std::string_view claims_json,
                                     std::string_view header_json = "{}",
                                     const CallOptions& call = {});
  /// The same with the claims as a JSON value (nlohmann::json; this header does not include
  /// it):
  ///
  ///   const auto now = std::chrono::system_clock::now();
  ///   nlohmann::json claims{{"sub", "alice"}, {"iat", seconds(now)}, {"exp", seconds(now) + 300}};
  ///   std::string jwt = client.sign_jwt("k", claims);
  template <JsonValue Json>
  [[nodiscard]] std::string sign_jwt(std::string_view kid, const Json& claims,
                                     std::string_view header_json = "{}",
                                     const CallOptions& call = {}) {
    const std::string text = claims.dump();  // anything but an object: jose::Error kMalformed
    return sign_jwt(kid, std::string_view(text), header_json, call);
  }

 private:
  class Impl;
  Impl& impl() const;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hsm
