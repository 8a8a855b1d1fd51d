// Keys of hsm-provider: what a URI names, what a loaded key holds, and the one place that asks
// the agent (get_public_key, sign).
#pragma once

#include <openssl/evp.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "provider_context.hpp"

namespace hsm::provider {

struct EvpPkeyDeleter {
  void operator()(EVP_PKEY* key) const noexcept { EVP_PKEY_free(key); }
};
struct EvpPkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* ctx) const noexcept { EVP_PKEY_CTX_free(ctx); }
};
struct EvpMdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};
struct EvpMdDeleter {
  void operator()(EVP_MD* md) const noexcept { EVP_MD_free(md); }
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyDeleter>;
using EvpPkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, EvpPkeyCtxDeleter>;
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, EvpMdCtxDeleter>;
using EvpMdPtr = std::unique_ptr<EVP_MD, EvpMdDeleter>;

/// The key types this provider manages, one keymgmt and one signature algorithm each.
enum class KeyKind : std::uint8_t { kEc, kRsa, kEd25519 };

struct KeyKindInfo {
  KeyKind kind;
  const char* keymgmt_names;    // names of the keymgmt (as the default provider spells them)
  const char* type;             // EVP_PKEY_is_a name, the store's data type
  const char* signature_names;  // names of the signature algorithm
  const char* signature;        // the keymgmt's answer to query_operation_name
};

inline constexpr std::array<KeyKindInfo, 3> kKeyKinds = {{
    {KeyKind::kEc, "EC:id-ecPublicKey:1.2.840.10045.2.1", "EC", "ECDSA", "ECDSA"},
    {KeyKind::kRsa, "RSA:rsaEncryption:1.2.840.113549.1.1.1", "RSA",
     "RSA:rsaEncryption:1.2.840.113549.1.1.1", "RSA"},
    {KeyKind::kEd25519, "ED25519:1.3.101.112", "ED25519", "ED25519:1.3.101.112", "ED25519"},
}};
static_assert(kKeyKinds[0].kind == KeyKind::kEc && kKeyKinds[1].kind == KeyKind::kRsa &&
              kKeyKinds[2].kind == KeyKind::kEd25519);

[[nodiscard]] constexpr const KeyKindInfo& info(KeyKind kind) {
  return kKeyKinds[static_cast<std::size_t>(kind)];
}

/// hsm:<kid> or hsm:<kid>?socket=<path>; %XX escapes are decoded in both.
struct KeyUri {
  std::string kid;
  std::string socket;  // "" = the provider's default socket
};
/// The parsed URI, or nullopt with the reason in `why`.
[[nodiscard]] std::optional<KeyUri> parse_key_uri(std::string_view uri, std::string& why);

/// A key as OpenSSL holds it (keydata). Immutable once made; shared between EVP_PKEYs and
/// signature contexts.
struct HsmKey {
  KeyKind kind;
  std::string kid;     // "" for a public key imported from another provider: it cannot sign
  std::string socket;  // "" = the default socket
  std::string alg;     // the key's alg as the agent reports it (ES256, PS256, ...)
  EvpPkeyPtr pub;      // the public key, held by the default provider in the private libctx

  [[nodiscard]] bool can_sign() const noexcept { return !kid.empty(); }
};

/// Asks the agent for `uri`'s public key. On failure raises an OpenSSL error naming the kid (not
/// found) or the socket (unreachable) and returns null.
[[nodiscard]] std::shared_ptr<const HsmKey> fetch_key(ProviderContext& provider, const KeyUri& uri);

/// The public key decoded from SPKI DER, in the private libctx; null when it is not an EC,
/// RSA or Ed25519 key.
[[nodiscard]] EvpPkeyPtr decode_spki(const ProviderContext& provider,
                                     std::span<const std::uint8_t> spki);
[[nodiscard]] std::optional<KeyKind> kind_of(const EVP_PKEY* key);

/// What the agent signs: a digest it did not compute, or the whole message (EdDSA).
struct SignRequest {
  std::string alg;
  bool is_digest = true;
  std::span<const std::uint8_t> input;
  bool der = false;  // ECDSA: an X.509/TLS DER ECDSA-Sig-Value instead of r||s
};
/// The signature, or nullopt after raising an OpenSSL error carrying the agent's code and
/// message. Blocks up to the client's timeout (openssl.cnf timeout_ms); retried as the client
/// retries.
[[nodiscard]] std::optional<std::vector<std::uint8_t>> sign_with_agent(ProviderContext& provider,
                                                                       const HsmKey& key,
                                                                       const SignRequest& request);

}  // namespace hsm::provider

namespace hsm::provider {

/// OpenSSL's keydata for this provider's keymgmt: an HsmKey (null until imported).
struct KeyData {
  ProviderContext* provider;
  KeyKind kind;
  std::shared_ptr<const HsmKey> key;
};

/// What the store loader hands to the keymgmt's load() as OSSL_OBJECT_PARAM_REFERENCE: the
/// bytes of this struct, living in the loader until load() has copied the key.
struct KeyReference {
  static constexpr std::uint32_t kMagic = 0x48534d4b;  // "HSMK"
  std::uint32_t magic = kMagic;
  ProviderContext* provider;
  std::shared_ptr<const HsmKey> key;
};

/// The hash of a JOSE alg ("SHA256" for ES256, RS256, PS256, ...); nullptr for EdDSA.
[[nodiscard]] const char* hash_of_alg(std::string_view alg);

}  // namespace hsm::provider
