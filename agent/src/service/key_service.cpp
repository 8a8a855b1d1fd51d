// KeyService over a real PKCS#11 token: a TokenState (Module -> Token -> SessionPool -> KeyStore,
// rebuilt after a token fault) and one handler per protocol method.
//
// Error handling is in one place (error_from_current_exception): RequestError carries its
// protocol code; Pkcs11Error becomes hsm_unavailable (session- and token-class CKRs, retryable)
// or hsm_error, with `ckr` set. Session-class errors are retried once on a fresh session (and,
// for a stale object handle, after dropping the cached handles of that kid). Token-class errors
// mark the token down (TokenState::mark_down): from then on every request answers
// hsm_unavailable at once, until the token supervisor has re-initialised the token
// (docs/reliability.md).
#include "service/key_service.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <new>
#include <utility>

#include "keys/algorithm.hpp"
#include "keys/algorithm_support.hpp"
#include "keys/key_store.hpp"
#include "keys/request_error.hpp"
#include "keys/signer.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/module.hpp"
#include "pkcs11/session_pool.hpp"
#include "pkcs11/token.hpp"
#include "service/token_state.hpp"
#include "service/token_supervisor.hpp"

namespace hsm::agent {
namespace {

using keys::RequestError;
using protocol::ErrorCode;

protocol::Error error_from_current_exception() {
  try {
    throw;
  } catch (const RequestError& e) {
    return protocol::Error{e.code(), e.what(), std::nullopt};
  } catch (const pkcs11::Pkcs11Error& e) {
    const auto error_class = e.error_class();
    const bool retryable =
        error_class == pkcs11::ErrorClass::kSession || error_class == pkcs11::ErrorClass::kToken;
    return protocol::Error{retryable ? ErrorCode::kHsmUnavailable : ErrorCode::kHsmError, e.what(),
                           std::string{e.ckr()}};
  } catch (const pkcs11::PoolClosedError& e) {
    return protocol::Error{ErrorCode::kHsmUnavailable, e.what(), std::nullopt};
  } catch (const std::bad_alloc&) {
    return protocol::Error{ErrorCode::kInternal, "out of memory", std::nullopt};
  } catch (const std::exception& e) {
    spdlog::error("unexpected error while executing a request: {}", e.what());
    return protocol::Error{ErrorCode::kInternal, e.what(), std::nullopt};
  } catch (...) {
    spdlog::error("unexpected non-standard exception while executing a request");
    return protocol::Error{ErrorCode::kInternal, "internal error", std::nullopt};
  }
}

const keys::Algorithm& algorithm_named(std::string_view name) {
  const keys::Algorithm* alg = keys::find_algorithm(name);
  if (alg == nullptr) {
    throw RequestError(ErrorCode::kUnsupportedAlg, "unknown alg '" + std::string{name} + "'");
  }
  return *alg;
}

template <typename T>
const T& params_as(const protocol::Request& request) {
  const T* params = std::get_if<T>(&request.params);
  if (params == nullptr) {
    throw RequestError(ErrorCode::kInvalidParams, "wrong parameters for this method");
  }
  return *params;
}

[[noreturn]] protocol::Result import_not_supported() {
  throw RequestError(ErrorCode::kNotSupported,
                     "import_key is not supported: keys are generated inside the HSM");
}

// The answer to every request while the token is down: at once, naming the fault, and not
// promising a re-initialisation when none will come (a refused PIN).
protocol::Error token_down_error(const std::optional<TokenFault>& fault) {
  if (!fault) {
    return protocol::Error{ErrorCode::kHsmUnavailable, "the token is down; re-initialising",
                           std::nullopt};
  }
  if (fault->until_restart) {
    return protocol::Error{ErrorCode::kHsmUnavailable,
                           "the token is down until the agent restarts: " + fault->reason,
                           fault->ckr};
  }
  return protocol::Error{ErrorCode::kHsmUnavailable,
                         "the token is down (" + fault->reason + "); re-initialising", fault->ckr};
}

keys::KeyEntryPtr find_key(keys::KeyStore& store, pkcs11::Session& session,
                           const std::string& kid) {
  keys::KeyEntryPtr key = store.find(session, kid);
  if (!key) throw RequestError(ErrorCode::kNotFound, "no key with kid '" + kid + "'");
  return key;
}

// The alg a request uses: the one asked for (which the key and the token must support), else
// the key's default.
const keys::Algorithm& resolve_alg(const keys::KeyEntry& key,
                                   const std::optional<std::string>& requested,
                                   protocol::SignatureFormat format) {
  const keys::Algorithm& alg = requested ? algorithm_named(*requested) : *key.default_alg;
  if (!key.can_use(alg)) throw RequestError(ErrorCode::kUnsupportedAlg, key.refusal(alg));
  if (format == protocol::SignatureFormat::kDer && alg.scheme != keys::SignScheme::kEcdsa) {
    throw RequestError(ErrorCode::kInvalidParams, "format 'der' applies to ECDSA algs only");
  }
  return alg;
}

}  // namespace

/// What one request works with: the request and the generation it holds.
struct KeyService::Context {
  const protocol::Request& request;
  TokenGeneration& generation;
  std::chrono::steady_clock::time_point deadline;  // bounds the wait for a session
};

KeyService::KeyService(std::shared_ptr<TokenState> state, AgentMetrics& metrics)
    : state_(std::move(state)), metrics_(metrics), read_only_(state_->read_only()) {
  const keys::AlgorithmSupport& support = state_->support();
  capabilities_.agent_version = HSM_AGENT_VERSION;
  capabilities_.supported_algs = support.supported_names();
  capabilities_.default_alg = support.default_name();
  bool any_generate = false;
  for (const keys::Algorithm& alg : keys::all_algorithms()) {
    any_generate = any_generate || support.plan(alg).can_generate;
  }
  capabilities_.can_create = !read_only_ && any_generate;
  capabilities_.can_import = false;
  capabilities_.can_delete = !read_only_;
}

KeyService::~KeyService() {
  close();
}

Outcome KeyService::execute(const protocol::Request& request,
                            std::chrono::steady_clock::time_point deadline) {
  try {
    if (closed_.load(std::memory_order_acquire)) {
      return protocol::Error{ErrorCode::kShuttingDown, "the agent is shutting down", std::nullopt};
    }
    // Answers that never need the token come first, so they do not depend on its state.
    if (request.method == protocol::Method::kCapabilities) {
      // The server answers capabilities (it adds the transport's limits): one place.
      spdlog::error("KeyService::execute was asked for capabilities, which the server answers");
      return protocol::Error{ErrorCode::kInternal, "capabilities is answered by the server",
                             std::nullopt};
    }
    if (request.method == protocol::Method::kImportKey) return import_not_supported();
    // Held for the whole request: the token is never finalised under it (token_state.hpp).
    const std::shared_ptr<TokenGeneration> generation = state_->acquire();
    if (!generation) {
      if (request.method == protocol::Method::kHealth) return health_while_down();
      return token_down_error(state_->fault());
    }
    Context context{request, *generation, deadline};
    return dispatch(request, context);
  } catch (...) {
    return error_from_current_exception();
  }
}

const protocol::TokenDescription& KeyService::token() const noexcept {
  return state_->description();
}

TokenStatus KeyService::token_status() const {
  TokenStatus status;
  status.up = !state_->is_down();
  if (auto fault = state_->fault()) status.last_fault = std::move(fault->reason);
  return status;
}

TokenSupervisor KeyService::supervise(HealthState& health, SupervisorOptions options) {
  return TokenSupervisor(*state_, health, metrics_, options);
}

void KeyService::close() noexcept {
  if (closed_.exchange(true)) return;
  // Sessions first, then the login (logout, anchor session), then the library (C_Finalize).
  state_->close();
}

protocol::Result KeyService::dispatch(const protocol::Request& request, Context& context) {
  switch (request.method) {
    case protocol::Method::kCapabilities:
      break;  // answered by the server; execute() refuses it before this
    case protocol::Method::kHealth:
      return health(context);
    case protocol::Method::kGenerateKey:
      return generate_key(context, params_as<protocol::GenerateKeyParams>(request));
    case protocol::Method::kImportKey:
      return import_not_supported();
    case protocol::Method::kSign: {
      const auto& params = params_as<protocol::SignParams>(request);
      auto [alg, signature] = sign_one(context, params);
      return protocol::SignResult{params.kid, std::string{alg}, std::move(signature)};
    }
    case protocol::Method::kVerify:
      return verify(context, params_as<protocol::VerifyParams>(request));
    case protocol::Method::kGetPublicKey:
      return get_public_key(context, params_as<protocol::KidParams>(request));
    case protocol::Method::kListKeys:
      return list_keys(context);
    case protocol::Method::kDeleteKey:
      return delete_key(context, params_as<protocol::KidParams>(request));
    case protocol::Method::kGetJwks:
      return get_jwks(context);
    case protocol::Method::kSignBatch:
      return sign_batch(context, params_as<protocol::SignBatchParams>(request));
  }
  throw RequestError(ErrorCode::kUnknownMethod, "unknown method");
}

// ---- helpers -------------------------------------------------------------------------------

// Runs `work` on a pooled session of the request's generation. A session-class PKCS#11 error
// (the session or a cached handle went stale) is retried once on a fresh session after
// discarding what was stale; a token-class error marks the token down; everything propagates
// to error_from_current_exception. `kid` names the key whose cached handles to drop on a
// stale handle (nullptr: all).
template <typename Work>
auto KeyService::with_session(Context& context, const std::string* kid, Work&& work)
    -> decltype(work(std::declval<pkcs11::Session&>())) {
  pkcs11::SessionPool& pool = *context.generation.pool;
  keys::KeyStore& store = *context.generation.keys;
  for (int attempt = 0;; ++attempt) {
    // The request's own deadline bounds the wait, whatever its timeout was.
    const auto wait = std::max(std::chrono::ceil<std::chrono::milliseconds>(
                                   context.deadline - std::chrono::steady_clock::now()),
                               std::chrono::milliseconds(0));
    auto lease = [&] {
      try {
        return pool.acquire(wait);  // PoolClosedError once the token is marked down
      } catch (const pkcs11::Pkcs11Error& e) {
        note_failure(context, e);  // a lost session could not be reopened
        throw;
      }
    }();
    if (!lease) {
      throw RequestError(ErrorCode::kDeadlineExceeded,
                         "no PKCS#11 session came free before the request's deadline");
    }
    try {
      return work(lease->session());
    } catch (const pkcs11::Pkcs11Error& e) {
      note_failure(context, e);
      const CK_RV rv = e.rv();
      if (pkcs11::is_stale_handle(rv)) {
        if (kid != nullptr) {
          store.invalidate(*kid);
        } else {
          store.invalidate_all();
        }
      } else if (e.error_class() == pkcs11::ErrorClass::kSession || rv == CKR_BUFFER_TOO_SMALL ||
                 rv == CKR_OPERATION_ACTIVE) {
        lease->mark_broken();  // closed and replaced when the lease ends
      } else {
        lease->mark_suspect();  // checked with C_GetSessionInfo before reuse
      }
      if (attempt > 0 || e.error_class() != pkcs11::ErrorClass::kSession) throw;
      spdlog::info("retrying once on a fresh session after {}", e.what());
    }
  }
}

std::vector<keys::KeyEntryPtr> KeyService::all_keys(Context& context) {
  return with_session(context, nullptr, [&](pkcs11::Session& session) {
    return context.generation.keys->list(session);
  });
}

// ---- methods -------------------------------------------------------------------------------
protocol::HealthResult KeyService::health(Context& context) {
  protocol::HealthResult result;
  result.token = state_->description();
  const auto start = std::chrono::steady_clock::now();
  try {
    // C_GetTokenInfo really asks the token (through the library), and needs no session, so
    // health answers even when every session is busy.
    (void)context.generation.token->info();
    result.ok = true;
  } catch (const pkcs11::Pkcs11Error& e) {
    note_failure(context, e);
    result.ok = false;
    result.error = e.what();
  }
  result.latency_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// health while the token is down: an answer, not an error (the caller asked how it is).
protocol::HealthResult KeyService::health_while_down() const {
  protocol::HealthResult result;
  result.token = state_->description();
  result.ok = false;
  result.error = token_down_error(state_->fault()).message;
  return result;
}

protocol::KeyDescription KeyService::generate_key(Context& context,
                                                  const protocol::GenerateKeyParams& params) {
  if (read_only_) {
    throw RequestError(ErrorCode::kPermissionDenied, "the agent runs read-only: no generate_key");
  }
  const keys::Algorithm& alg = algorithm_named(params.alg.value_or(capabilities_.default_alg));
  std::uint32_t rsa_bits = keys::kDefaultRsaBits;
  if (params.rsa_bits) {
    if (alg.key_type != keys::KeyType::kRsa) {
      throw RequestError(ErrorCode::kInvalidParams, "rsa_bits applies to RSA algs only");
    }
    if (*params.rsa_bits != 2048 && *params.rsa_bits != 3072 && *params.rsa_bits != 4096) {
      throw RequestError(ErrorCode::kInvalidParams, "rsa_bits must be 2048, 3072 or 4096");
    }
    rsa_bits = *params.rsa_bits;
  }
  keys::KeyEntryPtr entry = with_session(context, &params.kid, [&](pkcs11::Session& session) {
    return context.generation.keys->generate(session, params.kid, alg, rsa_bits);
  });
  // The alg asked for, which the token records (CKA_ALLOWED_MECHANISMS) so that later lookups
  // report it too; a token without that attribute reports the RSA default later (docs/keys.md).
  return protocol::KeyDescription{params.kid, std::string{alg.name},
                                  keys::jwk_with(entry->public_key_info, params.kid, alg.name)};
}

std::pair<std::string_view, protocol::Bytes> KeyService::sign_one(
    Context& context, const protocol::SignParams& params) {
  const keys::SignInputView input(params.input);
  const protocol::SignatureFormat format = params.format.value_or(protocol::SignatureFormat::kRaw);
  const keys::Algorithm* used = nullptr;
  protocol::Bytes signature = with_session(context, &params.kid, [&](pkcs11::Session& session) {
    const keys::KeyEntryPtr key = find_key(*context.generation.keys, session, params.kid);
    used = &resolve_alg(*key, params.alg, format);
    return keys::sign(session, *key, state_->support().plan(*used), input, format);
  });
  return {used->name, std::move(signature)};
}

protocol::VerifyResult KeyService::verify(Context& context, const protocol::VerifyParams& params) {
  const keys::SignInputView input(params.input);
  const protocol::SignatureFormat format = params.format.value_or(protocol::SignatureFormat::kRaw);
  const keys::KeyEntryPtr key = with_session(context, &params.kid, [&](pkcs11::Session& session) {
    return find_key(*context.generation.keys, session, params.kid);
  });
  const keys::Algorithm& alg = resolve_alg(*key, params.alg, format);
  return protocol::VerifyResult{
      keys::verify(*key, state_->support().plan(alg), input, params.signature, format)};
}

protocol::PublicKeyResult KeyService::get_public_key(Context& context,
                                                     const protocol::KidParams& params) {
  const keys::KeyEntryPtr key = with_session(context, &params.kid, [&](pkcs11::Session& session) {
    return find_key(*context.generation.keys, session, params.kid);
  });
  return protocol::PublicKeyResult{key->kid, std::string{key->default_alg->name},
                                   key->public_key_info.jwk, key->public_key_info.spki};
}

protocol::ListKeysResult KeyService::list_keys(Context& context) {
  protocol::ListKeysResult result;
  for (const auto& key : all_keys(context)) {
    result.keys.push_back(protocol::KeyDescription{key->kid, std::string{key->default_alg->name},
                                                   key->public_key_info.jwk});
  }
  return result;
}

protocol::JwksResult KeyService::get_jwks(Context& context) {
  protocol::JwksResult result;
  for (const auto& key : all_keys(context)) result.keys.push_back(key->public_key_info.jwk);
  return result;
}

protocol::DeleteKeyResult KeyService::delete_key(Context& context,
                                                 const protocol::KidParams& params) {
  if (read_only_) {
    throw RequestError(ErrorCode::kPermissionDenied, "the agent runs read-only: no delete_key");
  }
  // Kept across a retry: a first attempt may have destroyed objects before its session broke.
  bool deleted = false;
  with_session(context, &params.kid, [&](pkcs11::Session& session) {
    deleted = context.generation.keys->remove(session, params.kid) || deleted;
    return 0;
  });
  return protocol::DeleteKeyResult{deleted};
}

// `params` come from decode_request, the one place that bounds a batch (1..kMaxBatchItems).
protocol::SignBatchResult KeyService::sign_batch(Context& context,
                                                 const protocol::SignBatchParams& params) {
  protocol::SignBatchResult result;
  result.results.reserve(params.items.size());
  for (const protocol::SignParams& item : params.items) {
    try {
      result.results.emplace_back(sign_one(context, item).second);
    } catch (...) {
      result.results.emplace_back(error_from_current_exception());
    }
  }
  return result;
}

// A token-class fault takes the token down (once per generation; later reports are no-ops).
void KeyService::note_failure(Context& context, const pkcs11::Pkcs11Error& e) {
  if (e.error_class() != pkcs11::ErrorClass::kToken) return;
  (void)state_->mark_down(context.generation.number, e.what(), std::string{e.ckr()});
}

std::unique_ptr<KeyService> KeyService::open(HsmConfig config, AgentMetrics& metrics) {
  const unsigned sessions = std::max(config.sessions, 1U);
  const unsigned max_sessions = std::max(config.max_sessions, sessions);
  const bool read_only = config.read_only;
  std::shared_ptr<TokenState> state = TokenState::open(std::move(config), metrics);
  const auto& description = state->description();
  spdlog::info("token '{}' ({} {}, serial {}) open with {} sessions (up to {}){}",
               description.label, description.manufacturer, description.model, description.serial,
               sessions, max_sessions, read_only ? ", read-only" : "");
  return std::make_unique<KeyService>(std::move(state), metrics);
}

}  // namespace hsm::agent
