// KeyStore: the keys on the token, addressed by kid (= CKA_LABEL), with a cache of what signing
// needs: kid -> {private key handle, public key handle, key type, default alg, public key}.
//
// The cache is filled on first use of a kid (one C_FindObjects on CKA_LABEL, then attribute
// reads), so the signing path does no C_FindObjects after that. It is invalidated for a kid on
// delete, and by the caller when a handle turns out stale (CKR_KEY_HANDLE_INVALID), so a key
// deleted or re-created outside the agent is found again. Absent kids are not cached: a key made
// by a vendor tool while the agent runs is found on its first use.
//
// Keys made outside the agent (pkcs11-tool --keypairgen --label X) are found by CKA_LABEL; the
// private key gives CKA_KEY_TYPE and CKA_EC_PARAMS (or CKA_MODULUS / CKA_PUBLIC_EXPONENT); the
// EC point comes from the public key with the same label, else from CKA_EC_POINT on the private
// key, else from the public key with the private key's CKA_ID (docs/keys.md).
//
// Thread-safety: all members are safe to call concurrently. Lookups share a std::shared_mutex;
// generate and delete of one kid are serialised by a per-kid lock, so two concurrent
// generate_key calls for one kid cannot both create a key. Each call uses the session passed in
// (held by the calling thread).
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "keys/algorithm.hpp"
#include "keys/public_key.hpp"

namespace hsm::agent::pkcs11 {
class Session;
}

namespace hsm::agent::keys {

class AlgorithmSupport;

struct KeyEntry {
  std::string kid;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;  // CK_INVALID_HANDLE when there is none
  KeyType key_type = KeyType::kEc;
  const Curve* curve = nullptr;            // EC and Edwards keys
  std::size_t modulus_bytes = 0;           // RSA keys
  const Algorithm* default_alg = nullptr;  // recorded_alg when there is one
  PublicKey public_key_info;               // its jwk carries kid, alg=default_alg and use
  // The private key's CKA_ALLOWED_MECHANISMS; empty when it has none (no restriction).
  std::vector<CK_MECHANISM_TYPE> allowed_mechanisms;
  // The one alg those mechanisms name (every key the agent generates; docs/keys.md), else
  // nullptr (no restriction, or one several algs fit, as CKM_RSA_PKCS_PSS alone).
  const Algorithm* recorded_alg = nullptr;

  /// Whether this key can sign with `alg`: its type and curve fit, and, when the token records
  /// an alg, it is that alg; else when the key has allowed mechanisms, they include one of the
  /// alg's (RSA without either: any RS* or PS*).
  [[nodiscard]] bool can_use(const Algorithm& alg) const noexcept;
  /// Whether the token lets this key use `mechanism` (true when it has no allowed list).
  [[nodiscard]] bool allows_mechanism(CK_MECHANISM_TYPE mechanism) const noexcept;
  /// The error message when !can_use(alg): names the recorded alg when there is one.
  [[nodiscard]] std::string refusal(const Algorithm& alg) const;
  /// Size of a signature by this key with `alg` (RSA: the modulus length).
  [[nodiscard]] std::size_t signature_bytes(const Algorithm& alg) const noexcept;
};

using KeyEntryPtr = std::shared_ptr<const KeyEntry>;

class KeyStore {
 public:
  explicit KeyStore(const AlgorithmSupport& support) : support_(support) {}

  /// The key `kid`, from the cache or the token; nullptr when the token has no private key with
  /// that label. Throws RequestError (unsupported key type, ambiguous label, no public key) or
  /// Pkcs11Error.
  [[nodiscard]] KeyEntryPtr find(pkcs11::Session& session, const std::string& kid);

  /// Generates a key pair inside the token for `kid`. Throws RequestError(already_exists) when
  /// any object has that label, RequestError(unsupported_alg) when the token cannot, or
  /// Pkcs11Error. `rsa_bits` is used for RSA algs only.
  [[nodiscard]] KeyEntryPtr generate(pkcs11::Session& session, const std::string& kid,
                                     const Algorithm& alg, std::uint32_t rsa_bits);

  /// Destroys the private and public key objects labelled `kid`; false when there were none.
  [[nodiscard]] bool remove(pkcs11::Session& session, const std::string& kid);

  /// Every usable key on the token (a private key with a label that is a valid kid and a
  /// supported type), sorted by kid.
  [[nodiscard]] std::vector<KeyEntryPtr> list(pkcs11::Session& session);

  /// Forgets the cached handles of `kid` (after CKR_KEY_HANDLE_INVALID, or a token reset).
  void invalidate(const std::string& kid);
  void invalidate_all();

 private:
  class KidLock;
  [[nodiscard]] KeyEntryPtr load(pkcs11::Session& session, const std::string& kid) const;
  void remember(const KeyEntryPtr& entry, std::uint64_t epoch_seen);

  const AlgorithmSupport& support_;
  mutable std::shared_mutex cache_mutex_;
  std::unordered_map<std::string, KeyEntryPtr> cache_;  // guarded by cache_mutex_
  std::uint64_t epoch_ = 0;  // bumped by every invalidation; guarded by cache_mutex_

  std::mutex kid_locks_mutex_;
  std::map<std::string, std::pair<std::unique_ptr<std::mutex>, unsigned>, std::less<>>
      kid_locks_;  // kid -> (mutex, users); guarded by kid_locks_mutex_
};

}  // namespace hsm::agent::keys
