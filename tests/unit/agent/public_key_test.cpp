// Public key export (SPKI and JWK) checked against OpenSSL: keys made by OpenSSL are exported
// from their public values by the agent's code, then parsed back (d2i_PUBKEY) and compared.
#include "keys/public_key.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/x509.h>

#include <catch2/catch.hpp>

#include "fixtures/openssl_check.hpp"
#include "hsm/common/openssl_ptr.hpp"
#include "keys/algorithm.hpp"

namespace keys = hsm::agent::keys;
using Bytes = hsm::protocol::Bytes;
using hsm::common::EvpPkeyPtr;

namespace {

Bytes encoded_point(EVP_PKEY* pkey) {
  std::size_t length = 0;
  REQUIRE(EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0,
                                          &length) == 1);
  Bytes point(length);
  REQUIRE(EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point.data(),
                                          point.size(), &length) == 1);
  return point;
}

Bytes bn_bytes(EVP_PKEY* pkey, const char* name, int width) {
  BIGNUM* bn = nullptr;
  REQUIRE(EVP_PKEY_get_bn_param(pkey, name, &bn) == 1);
  Bytes out(static_cast<std::size_t>(width > 0 ? width : BN_num_bytes(bn)));
  BN_bn2binpad(bn, out.data(), static_cast<int>(out.size()));
  BN_free(bn);
  return out;
}

EvpPkeyPtr parse_spki(const Bytes& spki) {
  const unsigned char* cursor = spki.data();
  EvpPkeyPtr parsed(d2i_PUBKEY(nullptr, &cursor, static_cast<long>(spki.size())));
  REQUIRE(parsed);
  REQUIRE(cursor == spki.data() + spki.size());
  return parsed;
}

EvpPkeyPtr generate_ec(const keys::Curve& curve) {
  EvpPkeyPtr pkey(EVP_EC_gen(std::string{curve.group}.c_str()));
  REQUIRE(pkey);
  return pkey;
}

}  // namespace

TEST_CASE("EC public keys: SPKI parses back to the same key, JWK x/y are its coordinates",
          "[public_key]") {
  for (const keys::Curve& curve : keys::all_curves()) {
    if (curve.key_type != keys::KeyType::kEc) continue;
    DYNAMIC_SECTION(curve.jwk_crv) {
      EvpPkeyPtr original = generate_ec(curve);
      const keys::PublicKey exported =
          keys::make_ec_public_key(curve, encoded_point(original.get()));

      EvpPkeyPtr parsed = parse_spki(exported.spki);
      CHECK(EVP_PKEY_eq(parsed.get(), original.get()) == 1);

      const int width = static_cast<int>(curve.field_bytes);
      CHECK(exported.jwk.at("kty") == "EC");
      CHECK(exported.jwk.at("crv") == curve.jwk_crv);
      CHECK(hsm::test::base64url_decode(exported.jwk.at("x")) ==
            bn_bytes(original.get(), OSSL_PKEY_PARAM_EC_PUB_X, width));
      CHECK(hsm::test::base64url_decode(exported.jwk.at("y")) ==
            bn_bytes(original.get(), OSSL_PKEY_PARAM_EC_PUB_Y, width));
      CHECK(exported.jwk.count("d") == 0);
      // An independent JWK -> SPKI conversion (the shared fixture) agrees.
      CHECK(hsm::test::spki_from_jwk(exported.jwk) == exported.spki);
    }
  }
}

TEST_CASE("EC JWK coordinates keep their leading zero bytes (exactly the curve size)",
          "[public_key]") {
  const keys::Curve& p256 = *keys::find_curve_by_nid(NID_X9_62_prime256v1);
  // About one key in 256 has an x below 2^248; search for one.
  for (int attempt = 0; attempt < 20000; ++attempt) {
    EvpPkeyPtr original = generate_ec(p256);
    const Bytes x = bn_bytes(original.get(), OSSL_PKEY_PARAM_EC_PUB_X, 32);
    if (x[0] != 0) continue;
    const keys::PublicKey exported = keys::make_ec_public_key(p256, encoded_point(original.get()));
    const Bytes jwk_x = hsm::test::base64url_decode(exported.jwk.at("x"));
    CHECK(jwk_x.size() == 32);
    CHECK(jwk_x == x);
    CHECK(exported.jwk.at("x").size() == 43);
    return;
  }
  FAIL("no P-256 key with a leading zero in x after 20000 tries");
}

TEST_CASE("a compressed EC point exports the same key as the uncompressed one", "[public_key]") {
  const keys::Curve& p384 = *keys::find_curve_by_nid(NID_secp384r1);
  EvpPkeyPtr original = generate_ec(p384);
  Bytes point = encoded_point(original.get());
  const Bytes y = bn_bytes(original.get(), OSSL_PKEY_PARAM_EC_PUB_Y, 48);
  Bytes compressed(point.begin(), point.begin() + 49);
  compressed[0] = (y.back() & 1) != 0 ? 0x03 : 0x02;
  const keys::PublicKey from_compressed = keys::make_ec_public_key(p384, compressed);
  const keys::PublicKey from_full = keys::make_ec_public_key(p384, point);
  CHECK(from_compressed.jwk == from_full.jwk);
  CHECK(EVP_PKEY_eq(parse_spki(from_compressed.spki).get(), original.get()) == 1);
}

TEST_CASE("an EC point that is not on the curve is refused", "[public_key]") {
  const keys::Curve& p256 = *keys::find_curve_by_nid(NID_X9_62_prime256v1);
  EvpPkeyPtr original = generate_ec(p256);
  Bytes point = encoded_point(original.get());
  point.back() ^= 0x01;
  CHECK_THROWS_AS(keys::make_ec_public_key(p256, point), std::invalid_argument);
  CHECK_THROWS_AS(keys::make_ec_public_key(p256, Bytes(65, 0)), std::invalid_argument);
}

TEST_CASE("Ed25519 public keys: SPKI and OKP JWK", "[public_key]") {
  EvpPkeyPtr original(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  REQUIRE(original);
  Bytes raw(32);
  std::size_t length = raw.size();
  REQUIRE(EVP_PKEY_get_raw_public_key(original.get(), raw.data(), &length) == 1);
  const keys::PublicKey exported = keys::make_ed25519_public_key(raw);
  CHECK(EVP_PKEY_eq(parse_spki(exported.spki).get(), original.get()) == 1);
  CHECK(exported.jwk.at("kty") == "OKP");
  CHECK(exported.jwk.at("crv") == "Ed25519");
  CHECK(hsm::test::base64url_decode(exported.jwk.at("x")) == raw);
  CHECK(hsm::test::spki_from_jwk(exported.jwk) == exported.spki);
  CHECK_THROWS_AS(keys::make_ed25519_public_key(Bytes(31, 1)), std::invalid_argument);
}

TEST_CASE("RSA public keys: SPKI and JWK n/e without leading zeros", "[public_key]") {
  EvpPkeyPtr original(EVP_RSA_gen(2048));
  REQUIRE(original);
  const Bytes n = bn_bytes(original.get(), OSSL_PKEY_PARAM_RSA_N, 0);
  const Bytes e = bn_bytes(original.get(), OSSL_PKEY_PARAM_RSA_E, 0);
  // A token may return the modulus with a leading zero byte: the export must not keep it.
  Bytes padded_n = n;
  padded_n.insert(padded_n.begin(), 0x00);
  const keys::PublicKey exported = keys::make_rsa_public_key(padded_n, e);
  CHECK(EVP_PKEY_eq(parse_spki(exported.spki).get(), original.get()) == 1);
  CHECK(exported.jwk.at("kty") == "RSA");
  CHECK(exported.jwk.at("e") == "AQAB");
  const Bytes jwk_n = hsm::test::base64url_decode(exported.jwk.at("n"));
  CHECK(jwk_n == n);
  CHECK(jwk_n.size() == 256);
  CHECK(hsm::test::spki_from_jwk(exported.jwk) == exported.spki);
  CHECK_THROWS_AS(keys::make_rsa_public_key(Bytes{0x00}, e), std::invalid_argument);
}

TEST_CASE("jwk_with adds kid, alg and use", "[public_key]") {
  EvpPkeyPtr original(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  Bytes raw(32);
  std::size_t length = raw.size();
  REQUIRE(EVP_PKEY_get_raw_public_key(original.get(), raw.data(), &length) == 1);
  const auto jwk = keys::jwk_with(keys::make_ed25519_public_key(raw), "my-key", "EdDSA");
  CHECK(jwk.at("kid") == "my-key");
  CHECK(jwk.at("alg") == "EdDSA");
  CHECK(jwk.at("use") == "sig");
  CHECK(jwk.size() == 6);
}
