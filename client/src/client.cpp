// hsm::Client: the public API, as thin wrappers that build a request, start a Call and turn
// the protocol's result into the public type.
#include "hsm/client.hpp"

#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "call.hpp"
#include "call_runner.hpp"
#include "hsm/jose.hpp"
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
  throw Error(std::string(kProtocolError), "the agent answered with another method's result");
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
  if (*format == "raw") {
    return protocol::SignatureFormat::kRaw;
  }
  if (*format == "der") {
    return protocol::SignatureFormat::kDer;
  }
  throw Error(std::string(kInvalidParams),
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

  /// Blocks until the answer or the deadline, whichever comes first.
  template <class T>
  T call(Prepared<T> prepared) {
    auto call = make<SyncCall<T>>(std::move(prepared));
    runner_.run(call, call->completion());  // may read the answer itself (Connection::await)
    return call->take().value();  // throws the call's hsm::Error here, on the caller's thread
  }

  template <class T>
  std::future<T> call_future(Prepared<T> prepared) {
    auto call = make<FutureCall<T>>(std::move(prepared));
    std::future<T> answer = call->future();
    runner_.start(call);
    return answer;
  }

  /// The key's alg for JOSE headers: cached per kid; `refresh` asks the agent again.
  std::string jose_alg(std::string_view kid, bool refresh) {
    {
      std::lock_guard lock(alg_mutex_);
      if (auto it = alg_by_kid_.find(kid); it != alg_by_kid_.end() && !refresh) {
        return it->second;
      }
    }
    std::string alg = call(prepare_get_public_key(kid)).alg;  // no lock held across the call
    std::lock_guard lock(alg_mutex_);
    alg_by_kid_.insert_or_assign(std::string(kid), alg);
    return alg;
  }

  std::string sign_jws(std::string_view kid, std::string_view header_json,
                       std::span<const std::uint8_t> payload, std::string_view defaults_json) {
    const std::string encoded_payload = jose::base64url_encode(payload);
    for (bool refresh : {false, true}) {
      const auto header = jose::detail::make_header(header_json, jose_alg(kid, refresh), kid,
                                                    options_.max_request_bytes, defaults_json);
      std::string signing_input =
          jose::base64url_encode(as_bytes(header.json)) + '.' + encoded_payload;
      SignOptions sign_options;
      sign_options.alg = header.alg;  // the agent refuses an alg the key cannot do
      try {
        const Signature sig =
            call(prepare_sign(kid, InputKind::kData, as_bytes(signing_input), sign_options));
        return signing_input + '.' + jose::base64url_encode(sig.signature);
      } catch (const Error& e) {
        // A cached alg refused: the key may have been replaced by one of another type.
        if (refresh || header.alg_from_caller || e.code() != "unsupported_alg") {
          throw;
        }
      }
    }
    throw std::logic_error("unreachable");
  }

  template <class T>
  void call_back(Prepared<T> prepared, Callback<T> done) {
    auto call = make<CallbackCall<T>>(std::move(prepared), std::move(done));
    runner_.start(call);
  }

 private:
  template <class C, class T, class... Extra>
  std::shared_ptr<C> make(Prepared<T>&& prepared, Extra&&... extra) {
    const Method method = prepared.request.method;
    return std::make_shared<C>(std::move(prepared.request), client::Clock::now() + options_.timeout,
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
ClientOptions with_socket_path(std::string socket_path) {
  ClientOptions options;
  options.socket_path = std::move(socket_path);
  return options;
}
}  // namespace

Client::Client(std::string socket_path) : Client(with_socket_path(std::move(socket_path))) {}
Client::Client(ClientOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
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

Capabilities Client::capabilities() {
  return impl().call(
      prepare<Capabilities>(Method::kCapabilities, protocol::EmptyParams{}, &to_capabilities));
}

Health Client::health() {
  return impl().call(prepare<Health>(Method::kHealth, protocol::EmptyParams{}, &to_health));
}

KeyInfo Client::generate_key(std::string_view kid, std::optional<std::string> alg,
                             std::optional<std::uint32_t> rsa_bits) {
  return impl().call(prepare_generate(kid, std::move(alg), rsa_bits));
}

Bytes Client::sign(std::string_view kid, std::span<const std::uint8_t> data) {
  return sign_detailed(kid, data).signature;
}

Bytes Client::sign(std::string_view kid, std::string_view data) {
  return sign_detailed(kid, as_bytes(data)).signature;
}

Bytes Client::sign_digest(std::string_view kid, std::span<const std::uint8_t> digest) {
  return sign_digest_detailed(kid, digest).signature;
}

Signature Client::sign_detailed(std::string_view kid, std::span<const std::uint8_t> data,
                                const SignOptions& options) {
  return impl().call(prepare_sign(kid, InputKind::kData, data, options));
}

Signature Client::sign_digest_detailed(std::string_view kid, std::span<const std::uint8_t> digest,
                                       const SignOptions& options) {
  return impl().call(prepare_sign(kid, InputKind::kDigest, digest, options));
}

bool Client::verify(std::string_view kid, std::span<const std::uint8_t> data,
                    std::span<const std::uint8_t> signature, const SignOptions& options) {
  return impl().call(prepare_verify(kid, InputKind::kData, data, signature, options));
}

bool Client::verify(std::string_view kid, std::string_view data,
                    std::span<const std::uint8_t> signature) {
  return verify(kid, as_bytes(data), signature);
}

bool Client::verify_digest(std::string_view kid, std::span<const std::uint8_t> digest,
                           std::span<const std::uint8_t> signature, const SignOptions& options) {
  return impl().call(prepare_verify(kid, InputKind::kDigest, digest, signature, options));
}

PublicKey Client::get_public_key(std::string_view kid) {
  return impl().call(prepare_get_public_key(kid));
}

std::vector<KeyInfo> Client::list_keys() {
  return impl().call(
      prepare<std::vector<KeyInfo>>(Method::kListKeys, protocol::EmptyParams{}, &to_key_list));
}

std::vector<Jwk> Client::get_jwks() {
  return impl().call(
      prepare<std::vector<Jwk>>(Method::kGetJwks, protocol::EmptyParams{}, &to_jwks));
}

bool Client::delete_key(std::string_view kid) {
  return impl().call(prepare_delete(kid));
}

// ---- Asynchronous forms
// ---------------------------------------------------------------------------

std::future<Capabilities> Client::capabilities_async() {
  return impl().call_future(
      prepare<Capabilities>(Method::kCapabilities, protocol::EmptyParams{}, &to_capabilities));
}
void Client::capabilities_async(Callback<Capabilities> done) {
  impl().call_back(
      prepare<Capabilities>(Method::kCapabilities, protocol::EmptyParams{}, &to_capabilities),
      std::move(done));
}

std::future<Health> Client::health_async() {
  return impl().call_future(prepare<Health>(Method::kHealth, protocol::EmptyParams{}, &to_health));
}
void Client::health_async(Callback<Health> done) {
  impl().call_back(prepare<Health>(Method::kHealth, protocol::EmptyParams{}, &to_health),
                   std::move(done));
}

std::future<KeyInfo> Client::generate_key_async(std::string_view kid,
                                                std::optional<std::string> alg,
                                                std::optional<std::uint32_t> rsa_bits) {
  return impl().call_future(prepare_generate(kid, std::move(alg), rsa_bits));
}
void Client::generate_key_async(std::string_view kid, std::optional<std::string> alg,
                                std::optional<std::uint32_t> rsa_bits, Callback<KeyInfo> done) {
  impl().call_back(prepare_generate(kid, std::move(alg), rsa_bits), std::move(done));
}

std::future<Signature> Client::sign_async(std::string_view kid, std::span<const std::uint8_t> data,
                                          const SignOptions& options) {
  return impl().call_future(prepare_sign(kid, InputKind::kData, data, options));
}
void Client::sign_async(std::string_view kid, std::span<const std::uint8_t> data,
                        Callback<Signature> done, const SignOptions& options) {
  impl().call_back(prepare_sign(kid, InputKind::kData, data, options), std::move(done));
}

std::future<Signature> Client::sign_digest_async(std::string_view kid,
                                                 std::span<const std::uint8_t> digest,
                                                 const SignOptions& options) {
  return impl().call_future(prepare_sign(kid, InputKind::kDigest, digest, options));
}
void Client::sign_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                               Callback<Signature> done, const SignOptions& options) {
  impl().call_back(prepare_sign(kid, InputKind::kDigest, digest, options), std::move(done));
}

std::future<bool> Client::verify_async(std::string_view kid, std::span<const std::uint8_t> data,
                                       std::span<const std::uint8_t> signature,
                                       const SignOptions& options) {
  return impl().call_future(prepare_verify(kid, InputKind::kData, data, signature, options));
}
void Client::verify_async(std::string_view kid, std::span<const std::uint8_t> data,
                          std::span<const std::uint8_t> signature, Callback<bool> done,
                          const SignOptions& options) {
  impl().call_back(prepare_verify(kid, InputKind::kData, data, signature, options),
                   std::move(done));
}

std::future<bool> Client::verify_digest_async(std::string_view kid,
                                              std::span<const std::uint8_t> digest,
                                              std::span<const std::uint8_t> signature,
                                              const SignOptions& options) {
  return impl().call_future(prepare_verify(kid, InputKind::kDigest, digest, signature, options));
}
void Client::verify_digest_async(std::string_view kid, std::span<const std::uint8_t> digest,
                                 std::span<const std::uint8_t> signature, Callback<bool> done,
                                 const SignOptions& options) {
  impl().call_back(prepare_verify(kid, InputKind::kDigest, digest, signature, options),
                   std::move(done));
}

std::future<PublicKey> Client::get_public_key_async(std::string_view kid) {
  return impl().call_future(prepare_get_public_key(kid));
}
void Client::get_public_key_async(std::string_view kid, Callback<PublicKey> done) {
  impl().call_back(prepare_get_public_key(kid), std::move(done));
}

std::future<std::vector<KeyInfo>> Client::list_keys_async() {
  return impl().call_future(
      prepare<std::vector<KeyInfo>>(Method::kListKeys, protocol::EmptyParams{}, &to_key_list));
}
void Client::list_keys_async(Callback<std::vector<KeyInfo>> done) {
  impl().call_back(
      prepare<std::vector<KeyInfo>>(Method::kListKeys, protocol::EmptyParams{}, &to_key_list),
      std::move(done));
}

std::future<std::vector<Jwk>> Client::get_jwks_async() {
  return impl().call_future(
      prepare<std::vector<Jwk>>(Method::kGetJwks, protocol::EmptyParams{}, &to_jwks));
}
void Client::get_jwks_async(Callback<std::vector<Jwk>> done) {
  impl().call_back(prepare<std::vector<Jwk>>(Method::kGetJwks, protocol::EmptyParams{}, &to_jwks),
                   std::move(done));
}

std::future<bool> Client::delete_key_async(std::string_view kid) {
  return impl().call_future(prepare_delete(kid));
}
void Client::delete_key_async(std::string_view kid, Callback<bool> done) {
  impl().call_back(prepare_delete(kid), std::move(done));
}

// ---- JOSE
// -----------------------------------------------------------------------------------------

std::string Client::sign_jws(std::string_view kid, std::string_view header_json,
                             std::span<const std::uint8_t> payload) {
  return impl().sign_jws(kid, header_json, payload, "{}");
}

std::string Client::sign_jws(std::string_view kid, std::string_view header_json,
                             std::string_view payload) {
  return impl().sign_jws(kid, header_json, as_bytes(payload), "{}");
}

std::string Client::sign_jwt(std::string_view kid, std::string_view claims_json,
                             std::string_view header_json) {
  const std::string claims =
      jose::detail::compact_claims(claims_json, impl().options().max_request_bytes);
  return impl().sign_jws(kid, header_json, as_bytes(claims), R"({"typ":"JWT"})");
}

}  // namespace hsm
