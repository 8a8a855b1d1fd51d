// Message types of the hsm-agent wire protocol (MessagePack-RPC over a Unix stream socket).
// The wire contract is documented in protocol/README.md; this header is its C++ form.
// Plain values: no I/O, no locking, safe to copy between threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace hsm::protocol {

using Bytes = std::vector<std::uint8_t>;
/// A JSON Web Key as the wire carries it: a map of str to str (never a private part).
/// std::map keeps the keys sorted, so encoding is deterministic.
using Jwk = std::map<std::string, std::string>;

inline constexpr std::uint32_t kProtocolVersion = 1;
inline constexpr std::size_t kMaxKidBytes = 255;
inline constexpr std::size_t kDefaultMaxMessageBytes = std::size_t{1024} * 1024;
/// Upper bound of items in one sign_batch request.
inline constexpr std::size_t kMaxBatchItems = 256;

/// msgpack-rpc message type tags.
inline constexpr std::uint8_t kRequestTag = 0;
inline constexpr std::uint8_t kResponseTag = 1;

enum class ErrorCode : std::uint8_t {
  kInvalidRequest,  // a message of the wrong shape
  kUnknownMethod,
  kInvalidParams,
  kNotFound,
  kAlreadyExists,
  kUnsupportedAlg,
  kNotSupported,
  kPermissionDenied,
  kHsmUnavailable,  // session or token gone; retryable
  kHsmError,        // any other CKR
  kOverloaded,      // retryable
  kShuttingDown,
  kDeadlineExceeded,
  kAuditUnavailable,  // the audit log cannot be written: key operations refused; retryable
  kInternal,
};

/// The wire name, e.g. "invalid_params".
[[nodiscard]] std::string_view to_string(ErrorCode code) noexcept;
[[nodiscard]] std::optional<ErrorCode> parse_error_code(std::string_view name) noexcept;
/// Every code, in declaration order (for tables and tests).
[[nodiscard]] const std::vector<ErrorCode>& all_error_codes();

enum class Method : std::uint8_t {
  kCapabilities,
  kHealth,
  kGenerateKey,
  kImportKey,
  kSign,
  kVerify,
  kGetPublicKey,
  kListKeys,
  kDeleteKey,
  kGetJwks,
  kSignBatch,
};

/// The wire name, e.g. "get_public_key".
[[nodiscard]] std::string_view to_string(Method method) noexcept;
[[nodiscard]] std::optional<Method> parse_method(std::string_view name) noexcept;
[[nodiscard]] const std::vector<Method>& all_methods();

/// The error half of a response.
struct Error {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
  std::optional<std::string> ckr;  // e.g. "CKR_DEVICE_ERROR" when a PKCS#11 call failed
  friend bool operator==(const Error&, const Error&) = default;
};

// ---- Request parameters --------------------------------------------------------------------

enum class SignatureFormat : std::uint8_t { kRaw, kDer };  // ECDSA only: JOSE r||s or X.509 DER

/// Parameters of methods that take none (capabilities, health, list_keys, get_jwks, import_key).
struct EmptyParams {
  friend bool operator==(const EmptyParams&, const EmptyParams&) = default;
};

struct KidParams {  // get_public_key, delete_key
  std::string kid;
  friend bool operator==(const KidParams&, const KidParams&) = default;
};

struct GenerateKeyParams {
  std::string kid;
  std::optional<std::string> alg;
  std::optional<std::uint32_t> rsa_bits;  // RSA algs only: 2048, 3072 or 4096
  friend bool operator==(const GenerateKeyParams&, const GenerateKeyParams&) = default;
};

/// The message itself (wire field "data"): the agent, or the token, hashes it.
struct Data {
  Bytes bytes;
  friend bool operator==(const Data&, const Data&) = default;
};

/// A digest the caller computed (wire field "digest"), signed as it is.
struct Digest {
  Bytes bytes;
  friend bool operator==(const Digest&, const Digest&) = default;
};

/// What is signed or verified: the message or a digest, exactly one by construction. The
/// decoder picks the alternative once, from the one field present (both or neither is
/// invalid_params there); nothing after it checks again.
using SignInput = std::variant<Data, Digest>;

/// The bytes of either alternative (the message or the digest).
[[nodiscard]] inline std::span<const std::uint8_t> input_bytes(const SignInput& input) noexcept {
  return std::visit([](const auto& in) { return std::span<const std::uint8_t>(in.bytes); }, input);
}

/// Whether `input` is a caller-computed digest.
[[nodiscard]] inline bool is_digest(const SignInput& input) noexcept {
  return std::holds_alternative<Digest>(input);
}

struct SignParams {
  std::string kid;
  SignInput input;
  std::optional<std::string> alg;
  std::optional<SignatureFormat> format;
  friend bool operator==(const SignParams&, const SignParams&) = default;
};

struct VerifyParams {
  std::string kid;
  SignInput input;
  Bytes signature;
  std::optional<std::string> alg;
  std::optional<SignatureFormat> format;
  friend bool operator==(const VerifyParams&, const VerifyParams&) = default;
};

struct SignBatchParams {
  std::vector<SignParams> items;  // 1..kMaxBatchItems
  friend bool operator==(const SignBatchParams&, const SignBatchParams&) = default;
};

using Params = std::variant<EmptyParams, KidParams, GenerateKeyParams, SignParams, VerifyParams,
                            SignBatchParams>;

struct Request {
  std::uint32_t msgid = 0;
  Method method = Method::kCapabilities;
  Params params;
  /// Optional per-request deadline, accepted in the params map of every method.
  std::optional<std::uint32_t> timeout_ms;
  friend bool operator==(const Request&, const Request&) = default;
};

// ---- Results -------------------------------------------------------------------------------

struct CapabilitiesResult {
  std::uint32_t protocol = kProtocolVersion;
  std::string agent_version;
  bool can_create = false;
  bool can_import = false;
  bool can_delete = false;
  std::vector<std::string> supported_algs;
  std::string default_alg;
  std::uint64_t max_message_bytes = kDefaultMaxMessageBytes;
  /// Where this agent serves its Prometheus metrics ("http://127.0.0.1:9464/metrics"), so a
  /// client on the same host or pod summarises the agent it talks to; nullopt when the agent
  /// serves none (--metrics-listen ""), or is older than the field (absent on the wire).
  std::optional<std::string> metrics_url;
  friend bool operator==(const CapabilitiesResult&, const CapabilitiesResult&) = default;
};

struct TokenDescription {
  std::string label;
  std::string manufacturer;
  std::string model;
  std::string serial;
  friend bool operator==(const TokenDescription&, const TokenDescription&) = default;
};

struct HealthResult {
  bool ok = false;
  double latency_ms = 0;
  std::optional<std::string> error;
  TokenDescription token;
  friend bool operator==(const HealthResult&, const HealthResult&) = default;
};

/// generate_key's result and one entry of list_keys.
struct KeyDescription {
  std::string kid;
  std::string alg;
  Jwk jwk;
  friend bool operator==(const KeyDescription&, const KeyDescription&) = default;
};

struct SignResult {
  std::string kid;
  std::string alg;
  Bytes signature;
  friend bool operator==(const SignResult&, const SignResult&) = default;
};

struct VerifyResult {
  bool valid = false;
  friend bool operator==(const VerifyResult&, const VerifyResult&) = default;
};

struct PublicKeyResult {
  std::string kid;
  std::string alg;
  Jwk jwk;
  Bytes spki;  // DER SubjectPublicKeyInfo
  friend bool operator==(const PublicKeyResult&, const PublicKeyResult&) = default;
};

struct ListKeysResult {
  std::vector<KeyDescription> keys;  // sorted by kid
  friend bool operator==(const ListKeysResult&, const ListKeysResult&) = default;
};

struct DeleteKeyResult {
  bool deleted = false;
  friend bool operator==(const DeleteKeyResult&, const DeleteKeyResult&) = default;
};

struct JwksResult {
  std::vector<Jwk> keys;
  friend bool operator==(const JwksResult&, const JwksResult&) = default;
};

/// One item of a sign_batch answer: on the wire {signature: bin} or {error: {code, message}}.
using BatchItemResult = std::variant<Bytes, Error>;

struct SignBatchResult {
  std::vector<BatchItemResult> results;  // in request order
  friend bool operator==(const SignBatchResult&, const SignBatchResult&) = default;
};

using Result =
    std::variant<CapabilitiesResult, HealthResult, KeyDescription, SignResult, VerifyResult,
                 PublicKeyResult, ListKeysResult, DeleteKeyResult, JwksResult, SignBatchResult>;

struct Response {
  std::uint32_t msgid = 0;
  std::variant<Error, Result> body;  // exactly one of error/result on the wire
  friend bool operator==(const Response&, const Response&) = default;
};

}  // namespace hsm::protocol
