#include "keys/public_key.hpp"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/x509.h>

#include <stdexcept>

#include "hsm/common/base64url.hpp"

namespace hsm::agent::keys {
namespace {

[[noreturn]] void invalid(const std::string& what) {
  ERR_clear_error();
  throw std::invalid_argument(what);
}

common::EvpPkeyPtr pkey_from_params(const char* type, OSSL_PARAM_BLD* builder, const char* what) {
  common::ParamPtr params(OSSL_PARAM_BLD_to_param(builder));
  common::OpenSslPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    invalid(std::string{"the token's "} + what + " is not a valid public key");
  }
  return common::EvpPkeyPtr(raw);
}

protocol::Bytes spki_of(EVP_PKEY* pkey) {
  const int length = i2d_PUBKEY(pkey, nullptr);
  if (length <= 0) invalid("cannot encode the public key as SubjectPublicKeyInfo");
  protocol::Bytes der(static_cast<std::size_t>(length));
  unsigned char* out = der.data();
  if (i2d_PUBKEY(pkey, &out) != length) invalid("cannot encode the public key");
  return der;
}

// A BIGNUM parameter of the key, big-endian, left-padded to `width` bytes (0: minimal).
protocol::Bytes bn_param(EVP_PKEY* pkey, const char* name, std::size_t width) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &raw) != 1) invalid(std::string{"no "} + name);
  common::BignumPtr bn(raw);
  const std::size_t size = width != 0 ? width : static_cast<std::size_t>(BN_num_bytes(bn.get()));
  protocol::Bytes out(size);
  if (BN_bn2binpad(bn.get(), out.data(), static_cast<int>(size)) < 0) {
    invalid(std::string{name} + " does not fit");
  }
  return out;
}

}  // namespace

PublicKey make_ec_public_key(const Curve& curve, std::span<const std::uint8_t> point) {
  if (curve.key_type != KeyType::kEc) throw std::logic_error("not a Weierstrass curve");
  common::ParamBldPtr builder(OSSL_PARAM_BLD_new());
  if (!builder ||
      OSSL_PARAM_BLD_push_utf8_string(builder.get(), OSSL_PKEY_PARAM_GROUP_NAME, curve.group.data(),
                                      curve.group.size()) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(builder.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                       point.size()) != 1) {
    throw std::bad_alloc();
  }
  common::EvpPkeyPtr pkey = pkey_from_params("EC", builder.get(), "EC point");
  // fromdata checks the encoding; the point must also be on the curve.
  common::OpenSslPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free> check(
      EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
  if (!check || EVP_PKEY_public_check(check.get()) != 1)
    invalid("the token's EC point is not on " + std::string{curve.jwk_crv});

  PublicKey key;
  key.spki = spki_of(pkey.get());
  key.jwk["kty"] = "EC";
  key.jwk["crv"] = std::string{curve.jwk_crv};
  key.jwk["x"] =
      common::base64url_encode(bn_param(pkey.get(), OSSL_PKEY_PARAM_EC_PUB_X, curve.field_bytes));
  key.jwk["y"] =
      common::base64url_encode(bn_param(pkey.get(), OSSL_PKEY_PARAM_EC_PUB_Y, curve.field_bytes));
  key.pkey = common::share(std::move(pkey));
  return key;
}

PublicKey make_ed25519_public_key(std::span<const std::uint8_t> point) {
  if (point.size() != 32) invalid("an Ed25519 public key is 32 bytes");
  common::EvpPkeyPtr pkey(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, point.data(), point.size()));
  if (!pkey) invalid("the token's Ed25519 point is not a valid public key");
  PublicKey key;
  key.spki = spki_of(pkey.get());
  key.jwk["kty"] = "OKP";
  key.jwk["crv"] = "Ed25519";
  key.jwk["x"] = common::base64url_encode(point);
  key.pkey = common::share(std::move(pkey));
  return key;
}

PublicKey make_rsa_public_key(std::span<const std::uint8_t> modulus,
                              std::span<const std::uint8_t> exponent) {
  common::BignumPtr n(BN_bin2bn(modulus.data(), static_cast<int>(modulus.size()), nullptr));
  common::BignumPtr e(BN_bin2bn(exponent.data(), static_cast<int>(exponent.size()), nullptr));
  if (!n || !e) throw std::bad_alloc();
  if (BN_is_zero(n.get()) || BN_is_zero(e.get()) || !BN_is_odd(n.get())) {
    invalid("the token's RSA modulus or exponent is not valid");
  }
  common::ParamBldPtr builder(OSSL_PARAM_BLD_new());
  if (!builder || OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(builder.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
    throw std::bad_alloc();
  }
  common::EvpPkeyPtr pkey = pkey_from_params("RSA", builder.get(), "RSA key");
  PublicKey key;
  key.spki = spki_of(pkey.get());
  key.jwk["kty"] = "RSA";
  // RFC 7518 6.3.1: unsigned big-endian, minimal (no leading zero octets).
  key.jwk["n"] = common::base64url_encode(bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_N, 0));
  key.jwk["e"] = common::base64url_encode(bn_param(pkey.get(), OSSL_PKEY_PARAM_RSA_E, 0));
  key.pkey = common::share(std::move(pkey));
  return key;
}

protocol::Jwk jwk_with(const PublicKey& key, std::string_view kid, std::string_view alg) {
  protocol::Jwk jwk = key.jwk;
  jwk["kid"] = std::string{kid};
  jwk["alg"] = std::string{alg};
  jwk["use"] = "sig";
  return jwk;
}

}  // namespace hsm::agent::keys
