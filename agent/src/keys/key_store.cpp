#include "keys/key_store.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <span>

#include "hsm/protocol/codec.hpp"
#include "keys/algorithm_support.hpp"
#include "keys/ec_encoding.hpp"
#include "keys/key_generation.hpp"
#include "keys/request_error.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/session.hpp"

namespace hsm::agent::keys {
namespace {

using protocol::ErrorCode;

// More objects than this under one label is not a key pair (and is refused as ambiguous).
constexpr std::size_t kMaxObjectsPerLabel = 16;
// list_keys / get_jwks read at most this many private keys.
constexpr std::size_t kMaxListedKeys = 10000;

std::span<const std::uint8_t> as_bytes(std::string_view text) {
  return {reinterpret_cast<const std::uint8_t*>(text.data()), text.size()};
}

struct TokenObject {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CK_OBJECT_CLASS object_class = CK_UNAVAILABLE_INFORMATION;
  CK_KEY_TYPE key_type = CK_UNAVAILABLE_INFORMATION;
  Bytes id;
};

CK_ULONG as_ulong(const std::optional<Bytes>& value) {
  if (!value || value->size() != sizeof(CK_ULONG)) return CK_UNAVAILABLE_INFORMATION;
  CK_ULONG result = 0;
  std::memcpy(&result, value->data(), sizeof(result));
  return result;
}

TokenObject describe_object(const pkcs11::Session& session, CK_OBJECT_HANDLE handle) {
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {CKA_CLASS, CKA_KEY_TYPE, CKA_ID};
  auto values = session.get_attributes(handle, kTypes);
  TokenObject object;
  object.handle = handle;
  object.object_class = as_ulong(values[0]);
  object.key_type = as_ulong(values[1]);
  if (values[2]) object.id = std::move(*values[2]);
  return object;
}

std::vector<TokenObject> objects_labelled(const pkcs11::Session& session, std::string_view kid) {
  CK_ATTRIBUTE label = pkcs11::bytes_attribute(CKA_LABEL, as_bytes(kid));
  std::vector<TokenObject> objects;
  for (const CK_OBJECT_HANDLE handle :
       session.find_objects(std::span(&label, 1), kMaxObjectsPerLabel + 1)) {
    objects.push_back(describe_object(session, handle));
  }
  return objects;
}

std::optional<Bytes> attribute_bytes(const pkcs11::Session& session, CK_OBJECT_HANDLE handle,
                                     CK_ATTRIBUTE_TYPE type) {
  if (handle == CK_INVALID_HANDLE) return std::nullopt;
  const CK_ATTRIBUTE_TYPE types[] = {type};
  return std::move(session.get_attributes(handle, types)[0]);
}

// The public key object that pairs with `private_key`, in the order of docs/keys.md: the one
// public key with the same label (or the one of them with the same CKA_ID), else the public key
// with the same CKA_ID found by a search on CKA_ID.
CK_OBJECT_HANDLE find_public_key(const pkcs11::Session& session,
                                 const std::vector<TokenObject>& labelled,
                                 const TokenObject& private_key) {
  std::vector<const TokenObject*> publics;
  for (const auto& object : labelled) {
    if (object.object_class == CKO_PUBLIC_KEY) publics.push_back(&object);
  }
  for (const auto* object : publics) {
    if (!private_key.id.empty() && object->id == private_key.id) return object->handle;
  }
  if (publics.size() == 1) return publics.front()->handle;
  if (private_key.id.empty()) return CK_INVALID_HANDLE;

  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  CK_ATTRIBUTE by_id[] = {pkcs11::scalar_attribute(CKA_CLASS, public_class),
                          pkcs11::bytes_attribute(CKA_ID, private_key.id)};
  const auto found = session.find_objects(by_id, 2);
  return found.size() == 1 ? found.front() : CK_INVALID_HANDLE;
}

// A label is listed as a kid only if a request could name it: the protocol's one kid rule.
bool is_valid_kid(std::span<const std::uint8_t> label) {
  return !protocol::kid_problem(
      std::string_view(reinterpret_cast<const char*>(label.data()), label.size()));
}

// The key's type, curve or size, default alg and public key, from the private key object and
// its public partner (entry->public_key, possibly CK_INVALID_HANDLE).
void fill_public_key(const pkcs11::Session& session, const std::string& kid,
                     const TokenObject& private_key, KeyEntry* entry) {
  switch (private_key.key_type) {
    case CKK_EC:
    case CKK_EC_EDWARDS: {
      auto params = attribute_bytes(session, private_key.handle, CKA_EC_PARAMS);
      if (!params) params = attribute_bytes(session, entry->public_key, CKA_EC_PARAMS);
      const Curve* curve = params ? parse_ec_params(*params) : nullptr;
      const KeyType expected = private_key.key_type == CKK_EC ? KeyType::kEc : KeyType::kEdwards;
      if (curve == nullptr || curve->key_type != expected) {
        throw RequestError(ErrorCode::kUnsupportedAlg,
                           "key '" + kid + "' is on a curve the agent does not support");
      }
      // The point: on the public key (standard), else on the private key (some vendors).
      std::optional<Bytes> point;
      if (auto value = attribute_bytes(session, entry->public_key, CKA_EC_POINT)) {
        point = unwrap_ec_point(*value, *curve);
      }
      if (!point) {
        if (auto value = attribute_bytes(session, private_key.handle, CKA_EC_POINT)) {
          point = unwrap_ec_point(*value, *curve);
        }
      }
      if (!point) {
        throw RequestError(ErrorCode::kHsmError,
                           "key '" + kid + "' has no readable public key (CKA_EC_POINT)");
      }
      entry->key_type = expected;
      entry->curve = curve;
      entry->default_alg = algorithm_for_curve(*curve);
      entry->public_key_info = expected == KeyType::kEc ? make_ec_public_key(*curve, *point)
                                                        : make_ed25519_public_key(*point);
      break;
    }
    case CKK_RSA: {
      static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {CKA_MODULUS, CKA_PUBLIC_EXPONENT};
      auto values = session.get_attributes(private_key.handle, kTypes);
      if ((!values[0] || !values[1]) && entry->public_key != CK_INVALID_HANDLE) {
        values = session.get_attributes(entry->public_key, kTypes);
      }
      if (!values[0] || !values[1]) {
        throw RequestError(ErrorCode::kHsmError,
                           "key '" + kid + "' has no readable public key (CKA_MODULUS)");
      }
      entry->key_type = KeyType::kRsa;
      // Unless CKA_ALLOWED_MECHANISMS says otherwise (apply_allowed_mechanisms), RSA keys
      // default to RS256 and may sign with any RS*/PS* alg (docs/keys.md).
      entry->default_alg = find_algorithm(kDefaultRsaAlgorithm);
      entry->public_key_info = make_rsa_public_key(*values[0], *values[1]);
      entry->modulus_bytes =
          static_cast<std::size_t>(EVP_PKEY_get_size(entry->public_key_info.pkey.get()));
      break;
    }
    default:
      throw RequestError(ErrorCode::kUnsupportedAlg,
                         "key '" + kid + "' has a key type the agent does not support");
  }
}

// The algs a key's type and curve fit, before any allowed-mechanism restriction.
bool fits_key(const KeyEntry& entry, const Algorithm& alg) noexcept {
  if (alg.key_type != entry.key_type) return false;
  return entry.key_type == KeyType::kRsa || alg.curve == entry.curve;
}

bool allows_alg(const KeyEntry& entry, const Algorithm& alg) noexcept {
  const auto& allowed = entry.allowed_mechanisms;
  const auto listed = [&](CK_MECHANISM_TYPE mechanism) {
    return mechanism != kNoMechanism &&
           std::find(allowed.begin(), allowed.end(), mechanism) != allowed.end();
  };
  return allowed.empty() || listed(alg.digest_mechanism) || listed(alg.combined_mechanism);
}

// Reads CKA_ALLOWED_MECHANISMS of the private key and derives the key's alg from it (after
// fill_public_key): the agent writes allowed_mechanisms(alg), in which only that alg's combined
// mechanism appears, so the alg is the one fitting alg whose combined mechanism is listed, else
// the one fitting alg at all. Several (CKM_RSA_PKCS_PSS alone: any PS*) leave the alg
// unrecorded, with the usual default when it fits, else the first fitting alg in table order.
void apply_allowed_mechanisms(const pkcs11::Session& session, const std::string& kid,
                              const TokenObject& private_key, KeyEntry* entry) {
  const auto value = attribute_bytes(session, private_key.handle, CKA_ALLOWED_MECHANISMS);
  if (!value || value->empty()) return;
  if (value->size() % sizeof(CK_MECHANISM_TYPE) != 0) {
    spdlog::warn("key '{}': CKA_ALLOWED_MECHANISMS of {} bytes is not a mechanism array; ignored",
                 kid, value->size());
    return;
  }
  entry->allowed_mechanisms.resize(value->size() / sizeof(CK_MECHANISM_TYPE));
  std::memcpy(entry->allowed_mechanisms.data(), value->data(), value->size());

  std::vector<const Algorithm*> fitting;
  std::vector<const Algorithm*> combined_listed;
  for (const Algorithm& alg : all_algorithms()) {
    if (!fits_key(*entry, alg) || !allows_alg(*entry, alg)) continue;
    fitting.push_back(&alg);
    const auto& allowed = entry->allowed_mechanisms;
    if (alg.combined_mechanism != kNoMechanism &&
        std::find(allowed.begin(), allowed.end(), alg.combined_mechanism) != allowed.end()) {
      combined_listed.push_back(&alg);
    }
  }
  if (fitting.empty()) {
    throw RequestError(ErrorCode::kUnsupportedAlg,
                       "key '" + kid +
                           "' allows none of the mechanisms the agent signs with "
                           "(CKA_ALLOWED_MECHANISMS)");
  }
  if (combined_listed.size() == 1) {
    entry->recorded_alg = combined_listed.front();
  } else if (combined_listed.empty() && fitting.size() == 1) {
    entry->recorded_alg = fitting.front();
  }
  if (entry->recorded_alg != nullptr) {
    entry->default_alg = entry->recorded_alg;
  } else if (std::find(fitting.begin(), fitting.end(), entry->default_alg) == fitting.end()) {
    entry->default_alg = fitting.front();
  }
}

}  // namespace

bool KeyEntry::can_use(const Algorithm& alg) const noexcept {
  if (!fits_key(*this, alg)) return false;
  if (recorded_alg != nullptr) return &alg == recorded_alg;
  return allows_alg(*this, alg);
}

bool KeyEntry::allows_mechanism(CK_MECHANISM_TYPE mechanism) const noexcept {
  return allowed_mechanisms.empty() ||
         std::find(allowed_mechanisms.begin(), allowed_mechanisms.end(), mechanism) !=
             allowed_mechanisms.end();
}

std::string KeyEntry::refusal(const Algorithm& alg) const {
  if (recorded_alg != nullptr && fits_key(*this, alg)) {
    return "key '" + kid + "' is a " + std::string{recorded_alg->name} +
           " key (its CKA_ALLOWED_MECHANISMS): it cannot be used with " + std::string{alg.name};
  }
  return "key '" + kid + "' cannot be used with " + std::string{alg.name};
}

std::size_t KeyEntry::signature_bytes(const Algorithm& alg) const noexcept {
  return alg.key_type == KeyType::kRsa ? modulus_bytes : alg.signature_bytes;
}

// Serialises generate and delete of one kid (other kids proceed in parallel).
class KeyStore::KidLock {
 public:
  KidLock(KeyStore& store, const std::string& kid) : store_(store), kid_(kid) {
    {
      std::lock_guard guard(store_.kid_locks_mutex_);
      auto& slot = store_.kid_locks_[kid_];
      if (!slot.first) slot.first = std::make_unique<std::mutex>();
      ++slot.second;
      mutex_ = slot.first.get();
    }
    mutex_->lock();
  }
  ~KidLock() {
    mutex_->unlock();
    std::lock_guard guard(store_.kid_locks_mutex_);
    auto it = store_.kid_locks_.find(kid_);
    if (--it->second.second == 0) store_.kid_locks_.erase(it);
  }
  KidLock(const KidLock&) = delete;
  KidLock& operator=(const KidLock&) = delete;

 private:
  KeyStore& store_;
  const std::string& kid_;
  std::mutex* mutex_ = nullptr;
};

KeyEntryPtr KeyStore::find(pkcs11::Session& session, const std::string& kid) {
  std::uint64_t epoch = 0;
  {
    std::shared_lock lock(cache_mutex_);
    if (auto it = cache_.find(kid); it != cache_.end()) return it->second;
    epoch = epoch_;
  }
  KeyEntryPtr entry = load(session, kid);
  if (entry) remember(entry, epoch);
  return entry;
}

void KeyStore::remember(const KeyEntryPtr& entry, std::uint64_t epoch_seen) {
  std::unique_lock lock(cache_mutex_);
  // An invalidation since the lookup began may concern this kid (a delete racing the load):
  // then do not cache what may be stale; the next lookup loads again.
  if (epoch_ == epoch_seen) cache_[entry->kid] = entry;
}

void KeyStore::invalidate(const std::string& kid) {
  std::unique_lock lock(cache_mutex_);
  cache_.erase(kid);
  ++epoch_;
}

void KeyStore::invalidate_all() {
  std::unique_lock lock(cache_mutex_);
  cache_.clear();
  ++epoch_;
}

KeyEntryPtr KeyStore::load(pkcs11::Session& session, const std::string& kid) const {
  const std::vector<TokenObject> labelled = objects_labelled(session, kid);
  std::vector<const TokenObject*> privates;
  for (const auto& object : labelled) {
    if (object.object_class == CKO_PRIVATE_KEY) privates.push_back(&object);
  }
  if (privates.empty()) return nullptr;
  if (privates.size() > 1) {
    throw RequestError(ErrorCode::kHsmError,
                       "kid '" + kid + "' is ambiguous: " + std::to_string(privates.size()) +
                           " private keys on the token have that label");
  }
  const TokenObject& private_key = *privates.front();

  auto entry = std::make_shared<KeyEntry>();
  entry->kid = kid;
  entry->private_key = private_key.handle;
  entry->public_key = find_public_key(session, labelled, private_key);

  try {
    fill_public_key(session, kid, private_key, entry.get());
    apply_allowed_mechanisms(session, kid, private_key, entry.get());
  } catch (const std::invalid_argument& e) {
    // The token's public values do not form a valid key (a point off the curve, ...).
    throw RequestError(ErrorCode::kHsmError, "key '" + kid + "': " + e.what());
  }
  entry->public_key_info.jwk = jwk_with(entry->public_key_info, kid, entry->default_alg->name);
  return entry;
}

KeyEntryPtr KeyStore::generate(pkcs11::Session& session, const std::string& kid,
                               const Algorithm& alg, std::uint32_t rsa_bits) {
  if (!support_.plan(alg).can_generate) {
    throw RequestError(ErrorCode::kUnsupportedAlg,
                       "this token cannot generate " + std::string{alg.name} + " keys");
  }
  KidLock lock(*this, kid);
  {
    std::shared_lock cache_lock(cache_mutex_);
    if (cache_.contains(kid)) {
      throw RequestError(ErrorCode::kAlreadyExists, "kid '" + kid + "' already exists");
    }
  }
  // Any object with this label takes the kid: a second key with the same label would make
  // every later lookup ambiguous.
  CK_ATTRIBUTE label = pkcs11::bytes_attribute(CKA_LABEL, as_bytes(kid));
  if (!session.find_objects(std::span(&label, 1), 1).empty()) {
    throw RequestError(ErrorCode::kAlreadyExists, "kid '" + kid + "' already exists");
  }

  KeyPairHandles handles;
  KeyPairSpec spec{&alg, kid, rsa_bits, true};
  if (generate_key_pair(session, spec, handles, {CKR_ATTRIBUTE_TYPE_INVALID}) != CKR_OK) {
    // A token without CKA_ALLOWED_MECHANISMS (pre-2.40): the key is made without its alg
    // recorded, and is then read back like an external key (docs/keys.md).
    spdlog::warn(
        "the token does not take CKA_ALLOWED_MECHANISMS: '{}' is made without its alg "
        "recorded",
        kid);
    spec.record_alg = false;
    handles = {};
    (void)generate_key_pair(session, spec, handles);
  }
  try {
    std::uint64_t epoch = 0;
    {
      std::shared_lock cache_lock(cache_mutex_);
      epoch = epoch_;
    }
    KeyEntryPtr entry = load(session, kid);
    if (!entry) throw RequestError(ErrorCode::kHsmError, "the generated key was not found");
    remember(entry, epoch);
    return entry;
  } catch (...) {
    // Leave no half-usable key behind under this kid.
    for (const CK_OBJECT_HANDLE object : {handles.private_key, handles.public_key}) {
      try {
        session.destroy_object(object);
      } catch (const pkcs11::Pkcs11Error& e) {
        spdlog::warn("cleaning up a failed key generation for '{}': {}", kid, e.what());
      }
    }
    throw;
  }
}

bool KeyStore::remove(pkcs11::Session& session, const std::string& kid) {
  KidLock lock(*this, kid);
  invalidate(kid);
  bool deleted = false;
  for (;;) {
    bool destroyed_any = false;
    for (const TokenObject& object : objects_labelled(session, kid)) {
      // Only key objects: a certificate that shares the key's label is not ours to remove.
      if (object.object_class != CKO_PRIVATE_KEY && object.object_class != CKO_PUBLIC_KEY) {
        continue;
      }
      session.destroy_object(object.handle);
      destroyed_any = true;
    }
    if (!destroyed_any) break;
    deleted = true;
  }
  invalidate(kid);  // a lookup that raced the deletion may have cached the old handles
  return deleted;
}

std::vector<KeyEntryPtr> KeyStore::list(pkcs11::Session& session) {
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_ATTRIBUTE by_class = pkcs11::scalar_attribute(CKA_CLASS, private_class);
  // A key deleted while the list is read is left out: its handle is then invalid
  // (CKR_OBJECT_HANDLE_INVALID), which is an answer about that key, not a fault of the listing.
  auto deleted_meanwhile = [](const pkcs11::Pkcs11Error& e) {
    return e.rv() == CKR_OBJECT_HANDLE_INVALID;
  };
  std::set<std::string> kids;
  for (const CK_OBJECT_HANDLE handle :
       session.find_objects(std::span(&by_class, 1), kMaxListedKeys)) {
    try {
      auto label = attribute_bytes(session, handle, CKA_LABEL);
      if (!label || !is_valid_kid(*label)) continue;
      kids.emplace(label->begin(), label->end());
    } catch (const pkcs11::Pkcs11Error& e) {
      if (!deleted_meanwhile(e)) throw;
    }
  }
  std::vector<KeyEntryPtr> keys;
  keys.reserve(kids.size());
  for (const std::string& kid : kids) {
    try {
      if (auto entry = find(session, kid)) keys.push_back(std::move(entry));
    } catch (const RequestError& e) {
      spdlog::debug("list_keys skips '{}': {}", kid, e.what());
    } catch (const std::invalid_argument& e) {
      spdlog::debug("list_keys skips '{}': {}", kid, e.what());
    } catch (const pkcs11::Pkcs11Error& e) {
      if (!deleted_meanwhile(e)) throw;
      spdlog::debug("list_keys skips '{}': deleted while the list was read", kid);
    }
  }
  return keys;  // std::set iterated in order: sorted by kid
}

}  // namespace hsm::agent::keys
