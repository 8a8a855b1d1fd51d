// hsm::Client: the public API, as thin wrappers that build a request, start a Call and turn
// the protocol's result into the public type.
#include "hsm/client.hpp"

#include <charconv>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include "call.hpp"
#include "call_runner.hpp"
#include "hsm/jose.hpp"
#include "hsm/protocol/codec.hpp"
#include "hsm/protocol/types.hpp"
#include "jose_alg.hpp"

namespace hsm {

using client::Call;
using client::CallbackCall;
using client::Converter;
using client::FutureCall;
using client::SyncCall;
using protocol::Method;

namespace {

/// Methods that are safe to send twice (see the retry rules in client.hpp).
constexpr bool is_idempotent(Method method) noexcept {
  switch (method) {
    case Method::kCapabilities:
    case Method::kHealth:
    case Method::kSign:
    case Method::kVerify:
    case Method::kGetPublicKey:
    case Method::kListKeys:
    case Method::kGetJwks:
    case Method::kSignBatch:
      return true;
    case Method::kGenerateKey:
    case Method::kImportKey:
    case Method::kDeleteKey:
      return false;
  }
  return false;
}

// ---- Results to public types ------------------------------------------------------------------

template <class R>
R expect(protocol::Result&& result) {
  if (auto* wanted = std::get_if<R>(&result)) {
    return std::move(*wanted);
  }
  throw Error(Errc::kProtocolError, "the agent answered with another method's result");
}

Capabilities to_capabilities(protocol::Result&& result) {
  auto r = expect<protocol::CapabilitiesResult>(std::move(result));
  return Capabilities{r.protocol,
                      std::move(r.agent_version),
                      r.can_create,
                      r.can_import,
                      r.can_delete,
                      std::move(r.supported_algs),
                      std::move(r.default_alg),
                      r.max_message_bytes,
                      std::move(r.metrics_url)};
}

Health to_health(protocol::Result&& result) {
  auto r = expect<protocol::HealthResult>(std::move(result));
  return Health{r.ok, r.latency_ms, std::move(r.error),
                TokenInfo{std::move(r.token.label), std::move(r.token.manufacturer),
                          std::move(r.token.model), std::move(r.token.serial)}};
}

KeyInfo to_key_info(protocol::KeyDescription&& key) {
  return KeyInfo{std::move(key.kid), std::move(key.alg), std::move(key.jwk)};
}

KeyInfo to_generated_key(protocol::Result&& result) {
  return to_key_info(expect<protocol::KeyDescription>(std::move(result)));
}

Signature to_signature(protocol::Result&& result) {
  auto r = expect<protocol::SignResult>(std::move(result));
  return Signature{std::move(r.kid), std::move(r.alg), std::move(r.signature)};
}

bool to_valid(protocol::Result&& result) {
  return expect<protocol::VerifyResult>(std::move(result)).valid;
}

PublicKey to_public_key(protocol::Result&& result) {
  auto r = expect<protocol::PublicKeyResult>(std::move(result));
  return PublicKey{std::move(r.kid), std::move(r.alg), std::move(r.jwk), std::move(r.spki)};
}

std::vector<KeyInfo> to_key_list(protocol::Result&& result) {
  auto r = expect<protocol::ListKeysResult>(std::move(result));
  std::vector<KeyInfo> keys;
  keys.reserve(r.keys.size());
  for (auto& key : r.keys) {
    keys.push_back(to_key_info(std::move(key)));
  }
  return keys;
}

std::vector<Jwk> to_jwks(protocol::Result&& result) {
  return expect<protocol::JwksResult>(std::move(result)).keys;
}

bool to_deleted(protocol::Result&& result) {
  return expect<protocol::DeleteKeyResult>(std::move(result)).deleted;
}

// ---- Public arguments to requests ---------------------------------------------------------------

/// A request and the converter of its answer, ready to become a Call.
template <class T>
struct Prepared {
  protocol::Request request;
  Converter<T> convert;
};

template <class T>
Prepared<T> prepare(Method method, protocol::Params params, Converter<T> convert) {
  protocol::Request request;
  request.method = method;
  request.params = std::move(params);
  return {std::move(request), convert};
}

std::optional<protocol::SignatureFormat> to_format(const std::optional<std::string>& format) {
  if (!format) {
    return std::nullopt;
  }
  if (auto parsed = protocol::parse_signature_format(*format)) {
    return parsed;
  }
  throw Error(Errc::kInvalidParams,
              "unknown signature format '" + *format + "' (expected raw or der)");
}

enum class InputKind : std::uint8_t { kData, kDigest };

protocol::SignInput to_input(InputKind kind, std::span<const std::uint8_t> bytes) {
  protocol::Bytes copy(bytes.begin(), bytes.end());
  if (kind == InputKind::kData) return protocol::Data{std::move(copy)};
  return protocol::Digest{std::move(copy)};
}

Prepared<Signature> prepare_sign(std::string_view kid, InputKind kind,
                                 std::span<const std::uint8_t> bytes, const SignOptions& options) {
  protocol::SignParams params{std::string(kid), to_input(kind, bytes), options.alg,
                              to_format(options.format)};
  return prepare<Signature>(Method::kSign, std::move(params), &to_signature);
}

Prepared<bool> prepare_verify(std::string_view kid, InputKind kind,
                              std::span<const std::uint8_t> bytes,
                              std::span<const std::uint8_t> signature, const SignOptions& options) {
  protocol::VerifyParams params{std::string(kid), to_input(kind, bytes),
                                Bytes(signature.begin(), signature.end()), options.alg,
                                to_format(options.format)};
  return prepare<bool>(Method::kVerify, std::move(params), &to_valid);
}

Prepared<KeyInfo> prepare_generate(std::string_view kid, std::optional<std::string> alg,
                                   std::optional<std::uint32_t> rsa_bits) {
  return prepare<KeyInfo>(Method::kGenerateKey,
                          protocol::GenerateKeyParams{std::string(kid), std::move(alg), rsa_bits},
                          &to_generated_key);
}

Prepared<PublicKey> prepare_get_public_key(std::string_view kid) {
  return prepare<PublicKey>(Method::kGetPublicKey, protocol::KidParams{std::string(kid)},
                            &to_public_key);
}

Prepared<bool> prepare_delete(std::string_view kid) {
  return prepare<bool>(Method::kDeleteKey, protocol::KidParams{std::string(kid)}, &to_deleted);
}

std::span<const std::uint8_t> as_bytes(std::string_view text) noexcept {
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): viewing chars as bytes
  return {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()};
}

}  // namespace

// ---- Client::Impl
// ---------------------------------------------------------------------------------

class Client::Impl {
 public:
  explicit Impl(ClientOptions options) : options_(std::move(options)), runner_(options_) {}

  [[nodiscard]] const ClientOptions& options() const noexcept { return options_; }

  /// The call's deadline: its own timeout or deadline (the earlier of the two), else now plus
  /// ClientOptions::timeout.
  [[nodiscard]] client::Clock::time_point deadline(const CallOptions& call) const {
    const auto now = client::Clock::now();
    if (!call.timeout && !call.deadline) {
      return now + options_.timeout;
    }
    auto deadline = client::Clock::time_point::max();
    if (call.timeout) {
      deadline = now + *call.timeout;
    }
    if (call.deadline) {
      deadline = std::min(deadline, *call.deadline);
    }
    return deadline;
  }

  /// The same options with the deadline fixed now: for several calls that share one deadline.
  [[nodiscard]] CallOptions fixed(const CallOptions& call) const {
    return CallOptions{std::nullopt, deadline(call), call.stop};
  }

  /// Blocks until the answer, the deadline or a stop, whichever comes first.
  template <class T>
  T call(Prepared<T> prepared, const CallOptions& options) {
    auto call = make<SyncCall<T>>(std::move(prepared), options);
    runner_.start(call, options.stop);
    runner_.read_answer_here(call);
    return call->take().value();  // throws the call's hsm::Error here, on the caller's thread
  }

  template <class T>
  std::future<T> call_future(Prepared<T> prepared, const CallOptions& options) {
    auto call = make<FutureCall<T>>(std::move(prepared), options);
    std::future<T> answer = call->future();
    runner_.start(call, options.stop);
    return answer;
  }

  template <class T>
  void call_back(Prepared<T> prepared, Callback<T> done, const CallOptions& options) {
    auto call = make<CallbackCall<T>>(std::move(prepared), options, std::move(done));
    runner_.start(call, options.stop);
  }

  /// The key's alg for JOSE headers: cached per kid; `refresh` asks the agent again.
  std::string jose_alg(std::string_view kid, bool refresh, const CallOptions& options) {
    {
      std::lock_guard lock(alg_mutex_);
      if (auto it = alg_by_kid_.find(kid); it != alg_by_kid_.end() && !refresh) {
        return it->second;
      }
    }
    // No lock held across the call.
    std::string alg = call(prepare_get_public_key(kid), options).alg;
    std::lock_guard lock(alg_mutex_);
    alg_by_kid_.insert_or_assign(std::string(kid), alg);
    return alg;
  }

  std::string sign_jws(std::string_view kid, std::string_view header_json,
                       std::span<const std::uint8_t> payload, std::string_view defaults_json,
                       const CallOptions& call_options) {
    const CallOptions options = fixed(call_options);  // one deadline for the look-up and sign
    const std::string encoded_payload = jose::base64url_encode(payload);
    for (bool refresh : {false, true}) {
      const auto header = jose::detail::make_header(header_json, jose_alg(kid, refresh, options),
                                                    kid, options_.max_request_bytes, defaults_json);
      std::string signing_input =
          jose::base64url_encode(as_bytes(header.json)) + '.' + encoded_payload;
      SignOptions sign_options;
      sign_options.alg = header.alg;  // the agent refuses an alg the key cannot do
      try {
        const Signature sig = call(
            prepare_sign(kid, InputKind::kData, as_bytes(signing_input), sign_options), options);
        return signing_input + '.' + jose::base64url_encode(sig.signature);
      } catch (const Error& e) {
        // A cached alg refused: the key may have been replaced by one of another type.
        if (refresh || header.alg_from_caller || e.errc() != Errc::kUnsupportedAlg) {
          throw;
        }
      }
    }
    throw std::logic_error("unreachable");
  }

 private:
  template <class C, class T, class... Extra>
  std::shared_ptr<C> make(Prepared<T>&& prepared, const CallOptions& options, Extra&&... extra) {
    const Method method = prepared.request.method;
    return std::make_shared<C>(std::move(prepared.request), deadline(options),
                               is_idempotent(method), prepared.convert,
                               std::forward<Extra>(extra)...);
  }

  const ClientOptions options_;
  std::mutex alg_mutex_;
  std::map<std::string, std::string, std::less<>> alg_by_kid_;  // guarded by alg_mutex_
  client::CallRunner runner_;
};

// ---- Client -------------------------------------------------------------------------------------

namespace {
/// ClientOptions::busy_poll resolved: the option, else HSM_CLIENT_BUSY_POLL_US, else 0; out of
/// range is invalid_params (a typo in a pod spec must not pass silently).
ClientOptions checked(ClientOptions options) {
  constexpr std::string_view kVariable = "HSM_CLIENT_BUSY_POLL_US";
  std::string from;
  if (!options.busy_poll) {
    const char* text = std::getenv(kVariable.data());  // NOLINT(concurrency-mt-unsafe)
    const std::string_view value = text == nullptr ? std::string_view() : std::string_view(text);
    long long micros = 0;
    if (!value.empty()) {
      const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), micros);
      if (error != std::errc() || end != value.data() + value.size()) {
        throw Error(Errc::kInvalidParams, std::string(kVariable) +
                                              " must be a whole number of microseconds, not '" +
                                              std::string(value.substr(0, 32)) + "'");
      }
      from = " (from " + std::string(kVariable) + ")";
    }
    options.busy_poll = std::chrono::microseconds(micros);
  }
  if (*options.busy_poll < std::chrono::microseconds::zero() ||
      *options.busy_poll > ClientOptions::kMaxBusyPoll) {
    throw Error(Errc::kInvalidParams, "ClientOptions::busy_poll must be between 0 and " +
                                          std::to_string(ClientOptions::kMaxBusyPoll.count()) +
                                          " us, not " + std::to_string(options.busy_poll->count()) +
                                          from);
  }
  return options;
}

ClientOptions with_socket_path(std::string socket_path) {
  ClientOptions options;
  options.socket_path = std::move(socket_path);
  return options;
}
}  // namespace

Client::Client(std::string socket_path) : Client(with_socket_path(std::move(socket_path))) {}
Client::Client(ClientOptions options)
    : impl_(std::make_unique<Impl>(checked(std::move(options)))) {}
Client::~Client() = default;
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;

Client::Impl& Client::impl() const {
  if (!impl_) {
    throw std::logic_error("hsm::Client used after it was moved from");
  }
  return *impl_;
}

const ClientOptions& Client::options() const {
  return impl().options();
}

namespace {
Prepared<Capabilities> prepare_capabilities() {
  return prepare<Capabilities>(Method::kCapabilities, protocol::EmptyParams{}, &to_capabilities);
}
Prepared<Health> prepare_health() {
  return prepare<Health>(Method::kHealth, protocol::EmptyParams{}, &to_health);
}
Prepared<std::vector<KeyInfo>> prepare_list_keys() {
  return prepare<std::vector<KeyInfo>>(Method::kListKeys, protocol::EmptyParams{}, &to_key_list);
}
Prepared<std::vector<Jwk>> prepare_get_jwks() {
  return prepare<std::vector<Jwk>>(Method::kGetJwks, protocol::EmptyParams{}, &to_jwks);
}
}  // namespace

Capabilities Client::capabilities(const CallOptions& call) {
  return impl().call(prepare_capabilities(), call);
}

Health Client::health(const CallOptions& call) {
  return impl().call(prepare_health(), call);
}

KeyInfo Client::generate_key(std::string_view kid, std::optional<std::string> alg,
                             std::optional<std::uint32_t> rsa_bits, const CallOptions& call) {
  return impl().call(prepare_generate(kid, std::move(alg), rsa_bits), call);
}

PublicKey Client::ensure_key(std::string_view kid, std::optional<std::string> alg,
                             const CallOptions& call) {
  const CallOptions options = impl().fixed(call);  // one deadline for every step
  auto checked = [&](PublicKey key) {
    if (alg && key.alg != *alg) {
      throw Error(Errc::kAlreadyExists,
                  "key '" + std::string(kid) + "' exists with alg " + key.alg + ", not " + *alg);
    }
    return key;
  };
  try {
    return checked(get_public_key(kid, options));
  } catch (const Error& e) {
    if (e.errc() != Errc::kNotFound) {
      throw;
    }
  }
  try {
    (void)generate_key(kid, alg, std::nullopt, options);
  } catch (const Error& e) {
    // already_exists: a concurrent creator won the race; read its key. connection_failed: the
    // request may have reached the agent (generate_key is never retried then); the key tells.
    if (e.errc() == Errc::kConnectionFailed) {
      try {
        return checked(get_public_key(kid, options));
      } catch (const Error& lookup) {
        if (lookup.errc() == Errc::kNotFound) {
          throw e;
        }
        throw;
      }
    }
    if (e.errc() != Errc::kAlreadyExists) {
      throw;
    }
  }
  return checked(get_public_key(kid, options));
}

Bytes Client::sign(std::string_view kid, std::span<const std::uint8_t> data,
                   const CallOptions& call) {
  return sign_detailed(kid, data, {}, call).signature;
}

Bytes Client::sign(std::string_view kid, std::string_view data, const CallOptions& call) {
  return sign_detailed(kid, as_bytes(data), {}, call).signature;
}

Bytes Client::sign_digest(std::string_view kid, std::span<const std::uint8_t> digest,
                          const CallOptions& call) {
  return sign_digest_detailed(kid, digest, {}, call).signature;
}

Signature Client::sign_detailed(std::string_view kid, std::span<const std::uint8_t> data,
                                const SignOptions& options, const CallOptions& call) {
  return impl().call(prepare_sign(kid, InputKind::kData, data, options), call);
}

Signature Client::sign_digest_detailed(std::string_view kid, std::span<const std::uint8_t> digest,
                                       const SignOptions& options, const CallOptions& call) {
  return impl().call(prepare_sign(kid, InputKind::kDigest, digest, options), call);
}

bool Client::verify(std::string_view kid, std::span<const std::uint8_t> data,
                    std::span<const std::uint8_t> signature, const SignOptions& options,
                    const CallOptions& call) {
  return impl().call(prepare_verify(kid, InputKind::kData, data, signature, options), call);
}

bool Client::verify(std::string_view kid, std::string_view data,
                    std::span<const std::uint8_t> signature, const CallOptions& call) {
  return verify(kid, as_bytes(data), signature, {}, call);
}

bool Client::verify_digest(std::string_view kid, std::span<const std::uint8_t> digest,
                           std::span<const std::uint8_t> signature, const SignOptions& options,
                           const CallOptions& call) {
  return impl().call(prepare_verify(kid, InputKind::kDigest, digest, signature, options), call);
}

PublicKey Client::get_public_key(std::string_view kid, const CallOptions& call) {
  return impl().call(prepare_get_public_key(kid), call);
}

std::vector<KeyInfo> Client::list_keys(const CallOptions& call) {
  return impl().call(prepare_list_keys(), call);
}

std::vector<Jwk> Client::get_jwks(const CallOptions& call) {
  return impl().call(prepare_get_jwks(), call);
}

bool Client::delete_key(std::string_view kid, const CallOptions& call) {
  return impl().call(prepare_delete(kid), call);
}

// ---- Asynchronous forms -------------------------------------------------------------------------

std::future<Capabilities> Client::capabilities_async(const CallOptions& call) {
  return impl().call_future(prepare_capabilities(), call);
}
void Client::capabilities_async(Callback<Capabilities> done, const CallOptions& call) {
  impl().call_back(prepare_capabilities(), std::move(done), call);
}

std::future<Health> Client::health_async(const CallOptions& call) {
  return impl().call_future(prepare_health(), call);
}
void Client::health_async(Callback<Health> done, const CallOptions& call) {
  impl().call_back(prepare_health(), std::move(done), call);
}

std::future<KeyInfo> Client::generate_key_async(std::string_view kid,
                                                std::optional<std::string> alg,
                                                std::optional<std::uint32_t> rsa_bits,
                                                const CallOptions& call) {
  return impl().call_future(prepare_generate(kid, std::move(alg), rsa_bits), call);
}
void Client::generate_key_async(std::string_view kid, std::optional<std::string> alg,
                                std::optional<std::uint32_t> rsa_bits, Callback<KeyInfo> done,
                                const CallOptions& call) {
  impl().call_back(prepare_generate(kid, std::move(alg), rsa_bits), std::move(done), call);
}

std::future<Signature> Client::sign_async(std::string_view kid, std::span<const std::uint8_t> data,
                                          const SignOptions& options, const CallOptions& call) {
  return impl().call_future(prepare_sign(kid, InputKind::kData, data, options), call);
}
void Client::sign_async(std::string_view kid, std::span<const std::uint8_t> data,
                        Callback<Signature> done, const SignOptions& options,
                        const CallOptions& call) {
  impl().call_back(prepare_sign(kid, InputKind::kData, data, options), std::move(done), call);
}

std::future<Signature> Client::sign_digest_async(std::string_view kid,
                                                 std::span<const std::uint8_t> digest,
                                                 const SignOptions& options,
                                                 const CallOptions& call) {
  return impl().call_future(prepare_sign(kid, InputKind::kDigest, digest, options), call);
}
void Client::sign_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                               Callback<Signature> done, const SignOptions& options,
                               const CallOptions& call) {
  impl().call_back(prepare_sign(kid, InputKind::kDigest, digest, options), std::move(done), call);
}

std::future<bool> Client::verify_async(std::string_view kid, std::span<const std::uint8_t> data,
                                       std::span<const std::uint8_t> signature,
                                       const SignOptions& options, const CallOptions& call) {
  return impl().call_future(prepare_verify(kid, InputKind::kData, data, signature, options), call);
}
void Client::verify_async(std::string_view kid, std::span<const std::uint8_t> data,
                          std::span<const std::uint8_t> signature, Callback<bool> done,
                          const SignOptions& options, const CallOptions& call) {
  impl().call_back(prepare_verify(kid, InputKind::kData, data, signature, options), std::move(done),
                   call);
}

std::future<bool> Client::verify_digest_async(std::string_view kid,
                                              std::span<const std::uint8_t> digest,
                                              std::span<const std::uint8_t> signature,
                                              const SignOptions& options, const CallOptions& call) {
  return impl().call_future(prepare_verify(kid, InputKind::kDigest, digest, signature, options),
                            call);
}
void Client::verify_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                                 std::span<const std::uint8_t> signature, Callback<bool> done,
                                 const SignOptions& options, const CallOptions& call) {
  impl().call_back(prepare_verify(kid, InputKind::kDigest, digest, signature, options),
                   std::move(done), call);
}

std::future<PublicKey> Client::get_public_key_async(std::string_view kid, const CallOptions& call) {
  return impl().call_future(prepare_get_public_key(kid), call);
}
void Client::get_public_key_async(std::string_view kid, Callback<PublicKey> done,
                                  const CallOptions& call) {
  impl().call_back(prepare_get_public_key(kid), std::move(done), call);
}

std::future<std::vector<KeyInfo>> Client::list_keys_async(const CallOptions& call) {
  return impl().call_future(prepare_list_keys(), call);
}
void Client::list_keys_async(Callback<std::vector<KeyInfo>> done, const CallOptions& call) {
  impl().call_back(prepare_list_keys(), std::move(done), call);
}

std::future<std::vector<Jwk>> Client::get_jwks_async(const CallOptions& call) {
  return impl().call_future(prepare_get_jwks(), call);
}
void Client::get_jwks_async(Callback<std::vector<Jwk>> done, const CallOptions& call) {
  impl().call_back(prepare_get_jwks(), std::move(done), call);
}

std::future<bool> Client::delete_key_async(std::string_view kid, const CallOptions& call) {
  return impl().call_future(prepare_delete(kid), call);
}
void Client::delete_key_async(std::string_view kid, Callback<bool> done, const CallOptions& call) {
  impl().call_back(prepare_delete(kid), std::move(done), call);
}

// ---- JOSE ---------------------------------------------------------------------------------------

std::string Client::sign_jws(std::string_view kid, std::string_view header_json,
                             std::span<const std::uint8_t> payload, const CallOptions& call) {
  return impl().sign_jws(kid, header_json, payload, "{}", call);
}

std::string Client::sign_jws(std::string_view kid, std::string_view header_json,
                             std::string_view payload, const CallOptions& call) {
  return impl().sign_jws(kid, header_json, as_bytes(payload), "{}", call);
}

std::string Client::sign_jwt(std::string_view kid, std::string_view claims_json,
                             std::string_view header_json, const CallOptions& call) {
  const std::string claims =
      jose::detail::compact_claims(claims_json, impl().options().max_request_bytes);
  return impl().sign_jws(kid, header_json, as_bytes(claims), R"({"typ":"JWT"})", call);
}

}  // namespace hsm
