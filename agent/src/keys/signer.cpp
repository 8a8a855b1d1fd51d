#include "keys/signer.hpp"

#include <openssl/err.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "hsm/common/ecdsa_signature.hpp"
#include "keys/ec_encoding.hpp"
#include "keys/request_error.hpp"
#include "pkcs11/error.hpp"
#include "pkcs11/session.hpp"

namespace hsm::agent::keys {
namespace {

using protocol::ErrorCode;
using protocol::SignatureFormat;

constexpr std::size_t kMaxDigestInfoPrefix = 19;  // SHA-2 DigestInfo prefixes are 19 bytes

}  // namespace

void check_usable(const KeyEntry& key, const AlgorithmPlan& plan, SignInputView input) {
  const Algorithm& alg = *plan.alg;
  if (!key.can_use(alg)) throw RequestError(ErrorCode::kUnsupportedAlg, key.refusal(alg));
  if (!plan.supported) {
    throw RequestError(ErrorCode::kUnsupportedAlg,
                       "this token does not support " + std::string{alg.name});
  }
  if (!input.is_digest) return;
  if (alg.hash == Hash::kNone) {
    throw RequestError(ErrorCode::kInvalidParams,
                       std::string{alg.name} + " signs the whole message: send data, not a digest");
  }
  if (input.bytes.size() != alg.digest_bytes) {
    throw RequestError(ErrorCode::kInvalidParams, "a " + std::string{alg.name} + " digest is " +
                                                      std::to_string(alg.digest_bytes) +
                                                      " bytes, got " +
                                                      std::to_string(input.bytes.size()));
  }
}

protocol::Bytes sign(pkcs11::Session& session, const KeyEntry& key, const AlgorithmPlan& plan,
                     SignInputView input, SignatureFormat format) {
  check_usable(key, plan, input);
  const Algorithm& alg = *plan.alg;

  std::array<std::uint8_t, kMaxDigestInfoPrefix + EVP_MAX_MD_SIZE> digest_buffer{};
  std::span<const std::uint8_t> to_sign;
  CK_MECHANISM mechanism{kNoMechanism, nullptr, 0};
  CK_RSA_PKCS_PSS_PARAMS pss{alg.pss_hash, alg.pss_mgf, alg.digest_bytes};

  // A key with allowed mechanisms that lack the combined one signs an agent-computed digest.
  if (alg.scheme == SignScheme::kEddsa ||
      (!input.is_digest && plan.message_mechanism != kNoMechanism &&
       key.allows_mechanism(plan.message_mechanism))) {
    // The token signs the message itself (EdDSA, or a combined hash-and-sign mechanism).
    mechanism.mechanism = plan.message_mechanism;
    to_sign = input.bytes;
  } else {
    if (plan.digest_mechanism == kNoMechanism) {
      throw RequestError(ErrorCode::kNotSupported,
                         "this token cannot sign a precomputed digest with " +
                             std::string{alg.name} + "; send data");
    }
    if (!key.allows_mechanism(plan.digest_mechanism)) {
      throw RequestError(ErrorCode::kNotSupported,
                         "key '" + key.kid + "' may not sign an agent-computed " +
                             std::string{alg.name} +
                             " digest (its CKA_ALLOWED_MECHANISMS lack the mechanism)" +
                             (input.is_digest ? "; send data" : ""));
    }
    mechanism.mechanism = plan.digest_mechanism;
    // PKCS#1 v1.5 over a bare digest: the token signs DigestInfo = prefix || digest.
    const std::span<const std::uint8_t> prefix = alg.scheme == SignScheme::kRsaPkcs1
                                                     ? digest_info_prefix(alg.hash)
                                                     : std::span<const std::uint8_t>{};
    std::copy(prefix.begin(), prefix.end(), digest_buffer.begin());
    const std::span<std::uint8_t> digest_out(digest_buffer.data() + prefix.size(), EVP_MAX_MD_SIZE);
    std::size_t digest_length = input.bytes.size();
    if (input.is_digest) {
      std::copy(input.bytes.begin(), input.bytes.end(), digest_out.begin());
    } else {
      digest_length = compute_digest(alg.hash, input.bytes, digest_out);
    }
    to_sign = std::span<const std::uint8_t>(digest_buffer.data(), prefix.size() + digest_length);
  }
  if (alg.scheme == SignScheme::kRsaPss) {
    mechanism.pParameter = &pss;
    mechanism.ulParameterLen = sizeof(pss);
  }

  // Sized in advance so that one C_Sign suffices: ECDSA leaves room for a token that answers
  // in DER; RSA signatures are the modulus length; Ed25519 signatures are 64 bytes.
  const std::size_t expected = key.signature_bytes(alg);
  const std::size_t capacity =
      alg.scheme == SignScheme::kEcdsa ? max_ecdsa_der_bytes(alg.curve->field_bytes) : expected;
  protocol::Bytes signature(capacity);
  signature.resize(session.sign(mechanism, key.private_key, to_sign, signature));

  switch (alg.scheme) {
    case SignScheme::kEcdsa:
      if (!normalize_ecdsa_signature(signature, alg.curve->field_bytes)) {
        throw RequestError(ErrorCode::kHsmError, "the token returned a malformed ECDSA signature");
      }
      if (format == SignatureFormat::kDer) {
        auto der = common::ecdsa_raw_to_der(signature, alg.curve->field_bytes);
        if (!der) throw RequestError(ErrorCode::kInternal, "cannot encode the signature as DER");
        return std::move(*der);
      }
      return signature;
    case SignScheme::kRsaPkcs1:
    case SignScheme::kRsaPss:
      if (signature.size() < expected) {
        // RFC 8017 signatures are exactly the modulus length; put back dropped leading zeros.
        const std::size_t pad = expected - signature.size();
        signature.insert(signature.begin(), pad, 0);
      }
      if (signature.size() != expected) {
        throw RequestError(ErrorCode::kHsmError, "the token returned an RSA signature of " +
                                                     std::to_string(signature.size()) + " bytes");
      }
      return signature;
    case SignScheme::kEddsa:
      if (signature.size() != expected) {
        throw RequestError(ErrorCode::kHsmError, "the token returned an Ed25519 signature of " +
                                                     std::to_string(signature.size()) + " bytes");
      }
      return signature;
  }
  return signature;
}

bool verify(const KeyEntry& key, const AlgorithmPlan& plan, SignInputView input,
            std::span<const std::uint8_t> signature, SignatureFormat format) {
  check_usable(key, plan, input);
  const Algorithm& alg = *plan.alg;
  EVP_PKEY* pkey = key.public_key_info.pkey.get();

  // OpenSSL verifies ECDSA in DER; a raw r||s must be exactly two curve-sized halves.
  protocol::Bytes der;
  if (alg.scheme == SignScheme::kEcdsa && format == SignatureFormat::kRaw) {
    auto converted = common::ecdsa_raw_to_der(signature, alg.curve->field_bytes);
    if (!converted) return false;
    der = std::move(*converted);
    signature = der;
  }
  if (signature.size() > static_cast<std::size_t>(EVP_PKEY_get_size(pkey))) return false;

  int result = 0;
  if (alg.scheme == SignScheme::kEddsa) {
    common::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
    result = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey) == 1
                 ? EVP_DigestVerify(ctx.get(), signature.data(), signature.size(),
                                    input.bytes.data(), input.bytes.size())
                 : -1;
  } else {
    const EVP_MD* md = evp_md(alg.hash);
    std::array<std::uint8_t, EVP_MAX_MD_SIZE> digest{};
    std::span<const std::uint8_t> digest_view = input.bytes;
    if (!input.is_digest) {
      digest_view = std::span<const std::uint8_t>(digest.data(),
                                                  compute_digest(alg.hash, input.bytes, digest));
    }
    common::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
    bool ready = ctx && EVP_PKEY_verify_init(ctx.get()) == 1 &&
                 EVP_PKEY_CTX_set_signature_md(ctx.get(), md) == 1;
    if (ready && alg.scheme == SignScheme::kRsaPss) {
      // RFC 7518 3.5: MGF1 with the same hash, salt length = hash length.
      ready = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) == 1 &&
              EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), md) == 1 &&
              EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), RSA_PSS_SALTLEN_DIGEST) == 1;
    } else if (ready && alg.scheme == SignScheme::kRsaPkcs1) {
      ready = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) == 1;
    }
    result = ready ? EVP_PKEY_verify(ctx.get(), signature.data(), signature.size(),
                                     digest_view.data(), digest_view.size())
                   : -1;
  }
  // A malformed signature makes OpenSSL queue errors; they are an answer (invalid), not a fault,
  // and must not leak into the next OpenSSL call on this thread.
  ERR_clear_error();
  return result == 1;
}

}  // namespace hsm::agent::keys
