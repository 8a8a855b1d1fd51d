// Signing on the token and verifying with OpenSSL, driven by the algorithm table.
//
// sign(): the hot path. Given a cached KeyEntry and a leased session it does exactly one
// C_SignInit and one C_Sign into a buffer sized in advance (no size query), hashing in the agent
// when the token signs a digest, and normalises the token's output (ECDSA to JOSE r||s).
//
// verify(): with OpenSSL against the cached public key, not on the token: the public key is
// public, OpenSSL gives the same answer, and verifying this way costs no session, no HSM round
// trip and no HSM capacity, which is the scarce resource (docs/keys.md).
#pragma once

#include <cstdint>
#include <span>

#include "hsm/protocol/types.hpp"
#include "keys/algorithm_support.hpp"
#include "keys/key_store.hpp"

namespace hsm::agent::pkcs11 {
class Session;
}

namespace hsm::agent::keys {

/// What is signed: the message (hashed by the agent or the token), or a digest from the caller.
/// A view of a protocol::SignInput, which must outlive it.
struct SignInputView {
  SignInputView(const protocol::SignInput& input) noexcept  // NOLINT: a view, implicit on purpose
      : bytes(protocol::input_bytes(input)), is_digest(protocol::is_digest(input)) {}

  std::span<const std::uint8_t> bytes;
  bool is_digest = false;
};

/// Checks that `alg` can be used with `key` and `input`: RequestError(unsupported_alg) when the
/// key or the token cannot do it; RequestError(invalid_params) for a digest to EdDSA or a digest
/// of the wrong length.
void check_usable(const KeyEntry& key, const AlgorithmPlan& plan, SignInputView input);

/// Signs; the signature in JOSE form (or DER for ECDSA with SignatureFormat::kDer).
/// Throws RequestError or pkcs11::Pkcs11Error.
[[nodiscard]] protocol::Bytes sign(pkcs11::Session& session, const KeyEntry& key,
                                   const AlgorithmPlan& plan, SignInputView input,
                                   protocol::SignatureFormat format);

/// True when `signature` is a valid signature of `input` by `key` with `plan.alg`. A signature
/// of the wrong length or encoding is simply not valid. Throws RequestError like check_usable.
[[nodiscard]] bool verify(const KeyEntry& key, const AlgorithmPlan& plan, SignInputView input,
                          std::span<const std::uint8_t> signature,
                          protocol::SignatureFormat format);

}  // namespace hsm::agent::keys
