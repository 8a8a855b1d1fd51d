// Offline JWS verification with OpenSSL 3, and the header/claims handling of sign_jws/sign_jwt.
// JSON goes through nlohmann::json (private to this file: it never reaches an installed header).
#include "hsm/jose.hpp"

#include <openssl/core_names.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>

#include "hsm/common/base64url.hpp"
#include "hsm/common/ecdsa_signature.hpp"
#include "hsm/common/openssl_ptr.hpp"
#include "jose_alg.hpp"

namespace hsm::jose {
namespace detail {
namespace {

// RFC 7518 section 3.1 and RFC 8037: every alg the agent supports (see the README's table).
constexpr std::array kAlgs = {
    AlgSpec{"ES256", Scheme::kEcdsa, "SHA256", "EC", "P-256", "prime256v1", 32},
    AlgSpec{"ES384", Scheme::kEcdsa, "SHA384", "EC", "P-384", "secp384r1", 48},
    AlgSpec{"ES512", Scheme::kEcdsa, "SHA512", "EC", "P-521", "secp521r1", 66},
    AlgSpec{"ES256K", Scheme::kEcdsa, "SHA256", "EC", "secp256k1", "secp256k1", 32},
    AlgSpec{"RS256", Scheme::kRsaPkcs1, "SHA256", "RSA", "", nullptr, 0},
    AlgSpec{"RS384", Scheme::kRsaPkcs1, "SHA384", "RSA", "", nullptr, 0},
    AlgSpec{"RS512", Scheme::kRsaPkcs1, "SHA512", "RSA", "", nullptr, 0},
    AlgSpec{"PS256", Scheme::kRsaPss, "SHA256", "RSA", "", nullptr, 0},
    AlgSpec{"PS384", Scheme::kRsaPss, "SHA384", "RSA", "", nullptr, 0},
    AlgSpec{"PS512", Scheme::kRsaPss, "SHA512", "RSA", "", nullptr, 0},
    AlgSpec{"EdDSA", Scheme::kEdDsa, nullptr, "OKP", "Ed25519", nullptr, 0},
};

/// Parses JSON text into an object; anything else (invalid JSON, an array, a string) is
/// kMalformed with `what` naming the input.
nlohmann::ordered_json parse_object(std::string_view text, const char* what) {
  auto parsed = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    throw Error(Reason::kMalformed, std::string(what) + " is not a JSON object");
  }
  return parsed;
}

void check_size(std::string_view text, std::size_t max_bytes, const char* what) {
  if (text.size() > max_bytes) {
    throw Error(Reason::kTooLarge, std::string(what) + " is " + std::to_string(text.size()) +
                                       " bytes, more than the limit of " +
                                       std::to_string(max_bytes));
  }
}

}  // namespace

const AlgSpec* find_alg(std::string_view alg) noexcept {
  const auto* found =
      std::find_if(kAlgs.begin(), kAlgs.end(), [&](const AlgSpec& a) { return a.alg == alg; });
  return found == kAlgs.end() ? nullptr : &*found;
}

Header make_header(std::string_view header_json, std::string_view key_alg, std::string_view kid,
                   std::size_t max_bytes, std::string_view defaults_json) {
  check_size(header_json, max_bytes, "the JWS header");
  const auto given =
      parse_object(header_json.empty() ? std::string_view{"{}"} : header_json, "the JWS header");
  Header header{{}, std::string(key_alg), false};
  if (auto it = given.find("alg"); it != given.end()) {
    // The caller chooses among the algs the key allows (an RSA key signs RS* and PS*); the
    // agent refuses one the key cannot do.
    if (!it->is_string() || find_alg(it->get<std::string>()) == nullptr) {
      throw Error(Reason::kUnsupportedAlg, "the header's alg " + it->dump() + " is not supported");
    }
    header.alg = it->get<std::string>();
    header.alg_from_caller = true;
  }
  // A caller's kid that disagrees with the key is a bug on their side: refuse rather than sign
  // something other than what they wrote.
  if (auto it = given.find("kid"); it != given.end() && *it != kid) {
    throw Error(Reason::kKidMismatch,
                "the header's kid " + it->dump() + " is not the key id '" + std::string(kid) + "'");
  }
  nlohmann::ordered_json out;
  out["alg"] = header.alg;
  out["kid"] = kid;
  for (const auto& [name, value] : given.items()) {
    if (name != "alg" && name != "kid") {
      out[name] = value;
    }
  }
  const auto defaults = nlohmann::ordered_json::parse(defaults_json);  // kept alive for items()
  for (const auto& [name, value] : defaults.items()) {
    if (!out.contains(name)) {
      out[name] = value;
    }
  }
  header.json = out.dump();
  return header;
}

std::string compact_claims(std::string_view claims_json, std::size_t max_bytes) {
  check_size(claims_json, max_bytes, "the JWT claims");
  return parse_object(claims_json, "the JWT claims").dump();
}

}  // namespace detail

using detail::AlgSpec;
using detail::Scheme;

namespace {

// ---- JWK to EVP_PKEY ------------------------------------------------------------------------

const std::string& member(const Jwk& jwk, const std::string& name) {
  auto it = jwk.find(name);
  if (it == jwk.end() || it->second.empty()) {
    throw Error(Reason::kBadKey, "the JWK has no \"" + name + "\"");
  }
  return it->second;
}

Bytes key_bytes(const Jwk& jwk, const std::string& name) {
  try {
    return base64url_decode(member(jwk, name));
  } catch (const Error& e) {
    if (e.reason() == Reason::kMalformed) {
      throw Error(Reason::kBadKey, "the JWK's \"" + name + "\" is not base64url");
    }
    throw;
  }
}

common::EvpPkeyPtr from_params(const char* type, OSSL_PARAM* params) {
  common::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
    throw Error(Reason::kBadKey, std::string("the JWK is not a valid ") + type + " public key");
  }
  common::EvpPkeyPtr key(raw);
  // fromdata decodes the point but does not prove it lies on the curve; check it here.
  common::EvpPkeyCtxPtr check(EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr));
  if (!check || EVP_PKEY_public_check(check.get()) != 1) {
    throw Error(Reason::kBadKey, std::string("the JWK is not a valid ") + type + " public key");
  }
  return key;
}

common::EvpPkeyPtr ec_key(const Jwk& jwk, const AlgSpec& spec) {
  const Bytes x = key_bytes(jwk, "x");
  const Bytes y = key_bytes(jwk, "y");
  if (x.size() != spec.field_bytes || y.size() != spec.field_bytes) {
    throw Error(Reason::kBadKey,
                "the JWK's x and y are not " + std::to_string(spec.field_bytes) + " bytes each");
  }
  Bytes point{0x04};  // SEC 1 uncompressed point
  point.insert(point.end(), x.begin(), x.end());
  point.insert(point.end(), y.begin(), y.end());
  common::ParamBldPtr build(OSSL_PARAM_BLD_new());
  if (!build ||
      OSSL_PARAM_BLD_push_utf8_string(build.get(), OSSL_PKEY_PARAM_GROUP_NAME, spec.ossl_group,
                                      0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(build.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                       point.size()) != 1) {
    throw Error(Reason::kBadKey, "out of memory building the EC key");
  }
  common::ParamPtr params(OSSL_PARAM_BLD_to_param(build.get()));
  return from_params("EC", params.get());
}

common::EvpPkeyPtr rsa_key(const Jwk& jwk) {
  const Bytes n = key_bytes(jwk, "n");
  const Bytes e = key_bytes(jwk, "e");
  // RFC 7518 section 3.3: keys of 2048 bits or more. Smaller ones are refused outright.
  if (n.size() < 256 || n.size() > 2048 || e.size() > 8) {
    throw Error(Reason::kBadKey, "the JWK's RSA modulus is not between 2048 and 16384 bits");
  }
  common::BignumPtr bn_n(BN_bin2bn(n.data(), static_cast<int>(n.size()), nullptr));
  common::BignumPtr bn_e(BN_bin2bn(e.data(), static_cast<int>(e.size()), nullptr));
  common::ParamBldPtr build(OSSL_PARAM_BLD_new());
  if (!bn_n || !bn_e || !build ||
      OSSL_PARAM_BLD_push_BN(build.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(build.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1) {
    throw Error(Reason::kBadKey, "out of memory building the RSA key");
  }
  common::ParamPtr params(OSSL_PARAM_BLD_to_param(build.get()));
  return from_params("RSA", params.get());
}

common::EvpPkeyPtr ed25519_key(const Jwk& jwk) {
  const Bytes x = key_bytes(jwk, "x");
  common::EvpPkeyPtr key(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, x.data(), x.size()));
  if (!key) {
    throw Error(Reason::kBadKey, "the JWK's x is not an Ed25519 public key");
  }
  return key;
}

/// The key for `spec`, after checking that the JWK is of the kind the alg needs.
common::EvpPkeyPtr public_key(const Jwk& jwk, const AlgSpec& spec) {
  const std::string& kty = member(jwk, "kty");
  auto crv = jwk.find("crv");
  const std::string_view jwk_crv = crv == jwk.end() ? std::string_view{} : crv->second;
  if (kty != spec.kty || jwk_crv != spec.crv) {
    throw Error(Reason::kAlgMismatch,
                "alg " + std::string(spec.alg) + " needs a " + std::string(spec.kty) +
                    (spec.crv.empty() ? "" : " " + std::string(spec.crv)) + " key; the JWK is " +
                    kty + (jwk_crv.empty() ? "" : " " + std::string(jwk_crv)));
  }
  if (auto alg = jwk.find("alg"); alg != jwk.end() && alg->second != spec.alg) {
    throw Error(Reason::kAlgMismatch,
                "the JWK is for alg " + alg->second + ", the JWS says " + std::string(spec.alg));
  }
  switch (spec.scheme) {
    case Scheme::kEcdsa:
      return ec_key(jwk, spec);
    case Scheme::kRsaPkcs1:
    case Scheme::kRsaPss:
      return rsa_key(jwk);
    case Scheme::kEdDsa:
      return ed25519_key(jwk);
  }
  throw Error(Reason::kUnsupportedAlg, "unreachable");
}

// ---- Signature check ------------------------------------------------------------------------

bool signature_valid(EVP_PKEY* key, const AlgSpec& spec, std::string_view signing_input,
                     const Bytes& signature) {
  const Bytes* sig = &signature;
  std::optional<Bytes> der;
  if (spec.scheme == Scheme::kEcdsa) {
    der = common::ecdsa_raw_to_der(signature, spec.field_bytes);
    if (!der) {
      return false;
    }
    sig = &*der;
  }
  common::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  EVP_PKEY_CTX* pctx = nullptr;  // owned by ctx
  if (!ctx ||
      EVP_DigestVerifyInit_ex(ctx.get(), &pctx, spec.digest, nullptr, nullptr, key, nullptr) != 1) {
    return false;
  }
  if (spec.scheme == Scheme::kRsaPss) {
    // RFC 7518 section 3.5: MGF1 with the same hash, salt length = hash length (not "auto").
    const EVP_MD* md = EVP_MD_fetch(nullptr, spec.digest, nullptr);
    const int salt = md == nullptr ? -1 : EVP_MD_get_size(md);
    EVP_MD_free(const_cast<EVP_MD*>(md));  // NOLINT(cppcoreguidelines-pro-type-const-cast)
    if (salt <= 0 || EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, salt) != 1) {
      return false;
    }
  } else if (spec.scheme == Scheme::kRsaPkcs1) {
    if (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) != 1) {
      return false;
    }
  }
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-reinterpret-cast): chars as bytes
  const auto* input = reinterpret_cast<const unsigned char*>(signing_input.data());
  return EVP_DigestVerify(ctx.get(), sig->data(), sig->size(), input, signing_input.size()) == 1;
}

// ---- Compact serialisation ------------------------------------------------------------------

struct Parsed {
  std::string_view signing_input;  // header.payload, as sent
  std::string header_json;
  const AlgSpec* spec = nullptr;
  std::optional<std::string> kid;
  Bytes payload;
  Bytes signature;
};

Bytes segment(std::string_view text, const char* what) {
  try {
    return base64url_decode(text);
  } catch (const Error&) {
    throw Error(Reason::kMalformed, std::string("the JWS ") + what + " is not base64url");
  }
}

Parsed parse_compact(std::string_view compact, const VerifyOptions& options) {
  if (compact.size() > options.max_bytes) {
    throw Error(Reason::kTooLarge, "the JWS is " + std::to_string(compact.size()) +
                                       " bytes, more than the limit of " +
                                       std::to_string(options.max_bytes));
  }
  const auto first = compact.find('.');
  const auto second = first == std::string_view::npos ? first : compact.find('.', first + 1);
  if (second == std::string_view::npos || compact.find('.', second + 1) != std::string_view::npos) {
    throw Error(Reason::kMalformed, "a compact JWS has three segments separated by '.'");
  }
  if (first == 0) {
    throw Error(Reason::kMalformed, "the JWS header is empty");
  }
  Parsed parsed;
  parsed.signing_input = compact.substr(0, second);
  const Bytes header = segment(compact.substr(0, first), "header");
  parsed.header_json.assign(header.begin(), header.end());
  parsed.payload = segment(compact.substr(first + 1, second - first - 1), "payload");
  parsed.signature = segment(compact.substr(second + 1), "signature");

  const auto json = nlohmann::json::parse(parsed.header_json, nullptr, false);
  if (json.is_discarded() || !json.is_object()) {
    throw Error(Reason::kMalformed, "the JWS header is not a JSON object");
  }
  auto alg = json.find("alg");
  if (alg == json.end() || !alg->is_string()) {
    throw Error(Reason::kUnsupportedAlg, "the JWS header has no alg");
  }
  const auto alg_name = alg->get<std::string>();
  parsed.spec = detail::find_alg(alg_name);
  if (parsed.spec == nullptr) {
    // "none" lands here too: an unsigned JWS is never accepted.
    throw Error(Reason::kUnsupportedAlg, "alg \"" + alg_name + "\" is not accepted");
  }
  if (options.expected_alg && *options.expected_alg != alg_name) {
    throw Error(Reason::kAlgMismatch,
                "alg " + alg_name + " is not the expected " + *options.expected_alg);
  }
  if (auto kid = json.find("kid"); kid != json.end()) {
    if (!kid->is_string()) {
      throw Error(Reason::kMalformed, "the JWS header's kid is not a string");
    }
    parsed.kid = kid->get<std::string>();
  }
  // RFC 7515 section 4.1.11: extensions listed in crit must be understood; this verifier
  // understands none, so such a JWS cannot be accepted.
  if (json.contains("crit")) {
    throw Error(Reason::kMalformed,
                "the JWS header has \"crit\" extensions this verifier "
                "does not implement");
  }
  if (json.contains("b64")) {
    throw Error(Reason::kMalformed, "unencoded payloads (b64) are not supported");
  }
  return parsed;
}

Verified check(Parsed&& parsed, const Jwk& jwk) {
  if (auto jwk_kid = jwk.find("kid");
      parsed.kid && jwk_kid != jwk.end() && jwk_kid->second != *parsed.kid) {
    throw Error(Reason::kKidMismatch,
                "the JWS kid '" + *parsed.kid + "' is not the JWK's '" + jwk_kid->second + "'");
  }
  const auto key = public_key(jwk, *parsed.spec);
  if (!signature_valid(key.get(), *parsed.spec, parsed.signing_input, parsed.signature)) {
    throw Error(Reason::kBadSignature,
                "the " + std::string(parsed.spec->alg) + " signature does not verify with the key");
  }
  return Verified{std::move(parsed.header_json), std::string(parsed.spec->alg),
                  std::move(parsed.kid), std::move(parsed.payload)};
}

Jwk to_jwk(const nlohmann::json& object) {
  if (!object.is_object()) {
    throw Error(Reason::kMalformed, "a JWK is not a JSON object");
  }
  Jwk jwk;
  for (const auto& [name, value] : object.items()) {
    if (value.is_string()) {  // key_ops, x5c and other non-string members are not needed
      jwk[name] = value.get<std::string>();
    }
  }
  return jwk;
}

}  // namespace

std::string_view reason_code(Reason reason) noexcept {
  switch (reason) {
    case Reason::kMalformed:
      return "jose_malformed";
    case Reason::kTooLarge:
      return "jose_too_large";
    case Reason::kUnsupportedAlg:
      return "jose_unsupported_alg";
    case Reason::kAlgMismatch:
      return "jose_alg_mismatch";
    case Reason::kKidMismatch:
      return "jose_kid_mismatch";
    case Reason::kBadKey:
      return "jose_bad_key";
    case Reason::kBadSignature:
      return "jose_bad_signature";
  }
  return "jose_error";
}

Error::Error(Reason reason, const std::string& message)
    : hsm::Error(std::string(reason_code(reason)), message), reason_(reason) {}

std::string base64url_encode(std::span<const std::uint8_t> bytes) {
  try {
    return common::base64url_encode(bytes);
  } catch (const std::length_error& e) {
    throw Error(Reason::kTooLarge, e.what());
  }
}

Bytes base64url_decode(std::string_view text) {
  try {
    return common::base64url_decode(text);
  } catch (const std::invalid_argument& e) {
    throw Error(Reason::kMalformed, e.what());
  }
}

Verified verify(std::string_view compact, const Jwk& jwk, const VerifyOptions& options) {
  return check(parse_compact(compact, options), jwk);
}

Verified verify(std::string_view compact, const std::vector<Jwk>& jwks,
                const VerifyOptions& options) {
  Parsed parsed = parse_compact(compact, options);
  if (!parsed.kid) {
    if (jwks.size() != 1) {
      throw Error(Reason::kKidMismatch,
                  "the JWS has no kid and the JWKS holds " + std::to_string(jwks.size()) + " keys");
    }
    return check(std::move(parsed), jwks.front());
  }
  for (const Jwk& jwk : jwks) {
    if (auto kid = jwk.find("kid"); kid != jwk.end() && kid->second == *parsed.kid) {
      return check(std::move(parsed), jwk);
    }
  }
  throw Error(Reason::kKidMismatch, "no key in the JWKS has kid '" + *parsed.kid + "'");
}

Verified verify_json(std::string_view compact, std::string_view jwk_or_jwks_json,
                     const VerifyOptions& options) {
  const auto json = nlohmann::json::parse(jwk_or_jwks_json, nullptr, false);
  if (json.is_discarded() || !json.is_object()) {
    throw Error(Reason::kMalformed, "the JWK/JWKS is not a JSON object");
  }
  if (auto keys = json.find("keys"); keys != json.end()) {
    if (!keys->is_array()) {
      throw Error(Reason::kMalformed, "the JWKS's \"keys\" is not an array");
    }
    std::vector<Jwk> jwks;
    jwks.reserve(keys->size());
    for (const auto& key : *keys) {
      jwks.push_back(to_jwk(key));
    }
    return verify(compact, jwks, options);
  }
  return verify(compact, to_jwk(json), options);
}

}  // namespace hsm::jose
