// EC point and EC params encodings as tokens return them, and ECDSA signature normalisation.
#include "keys/ec_encoding.hpp"

#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/obj_mac.h>

#include <catch2/catch.hpp>
#include <numeric>

#include "hsm/common/ecdsa_signature.hpp"
#include "keys/algorithm.hpp"

namespace keys = hsm::agent::keys;
using keys::Bytes;

namespace {

const keys::Curve& curve(int nid) {
  const keys::Curve* found = keys::find_curve_by_nid(nid);
  REQUIRE(found != nullptr);
  return *found;
}

// An uncompressed point of the right size (not on the curve: the unwrap does not check that).
Bytes fake_point(std::size_t field_bytes, std::uint8_t first_x_byte = 0x11) {
  Bytes point(1 + 2 * field_bytes, 0x5A);
  point[0] = 0x04;
  point[1] = first_x_byte;
  return point;
}

Bytes concat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

}  // namespace

TEST_CASE("a raw uncompressed P-256 point is returned unchanged", "[ec_point]") {
  const Bytes point = fake_point(32);
  const auto unwrapped = keys::unwrap_ec_point(point, curve(NID_X9_62_prime256v1));
  REQUIRE(unwrapped);
  CHECK(*unwrapped == point);
}

TEST_CASE("a DER short-form OCTET STRING around a P-256 point is unwrapped", "[ec_point]") {
  const Bytes point = fake_point(32);
  const Bytes wrapped = concat({{0x04, 0x41}, point});
  const auto unwrapped = keys::unwrap_ec_point(wrapped, curve(NID_X9_62_prime256v1));
  REQUIRE(unwrapped);
  CHECK(*unwrapped == point);
}

TEST_CASE("a raw point whose x looks like a DER length is still taken as raw", "[ec_point]") {
  // 0x04 0x3F followed by 63 bytes is also a well-formed OCTET STRING of 63 bytes: the length
  // the curve fixes decides, not the first bytes.
  const Bytes point = fake_point(32, 0x3F);
  const auto unwrapped = keys::unwrap_ec_point(point, curve(NID_X9_62_prime256v1));
  REQUIRE(unwrapped);
  CHECK(*unwrapped == point);
}

TEST_CASE("P-521's 133-byte point in a DER long-form (0x81) OCTET STRING is unwrapped",
          "[ec_point]") {
  const Bytes point = fake_point(66);
  REQUIRE(point.size() == 133);
  const Bytes wrapped = concat({{0x04, 0x81, 0x85}, point});
  const auto unwrapped = keys::unwrap_ec_point(wrapped, curve(NID_secp521r1));
  REQUIRE(unwrapped);
  CHECK(*unwrapped == point);
  // And the raw form of the same point.
  CHECK(keys::unwrap_ec_point(point, curve(NID_secp521r1)) == point);
}

TEST_CASE("Ed25519 points: raw 32 bytes or DER-wrapped, told apart by length", "[ec_point]") {
  Bytes point(32);
  std::iota(point.begin(), point.end(), std::uint8_t{1});
  point[0] = 0x04;  // a raw point may start like an OCTET STRING tag
  point[1] = 0x1E;
  const auto& ed25519 = curve(NID_ED25519);
  CHECK(keys::unwrap_ec_point(point, ed25519) == point);
  CHECK(keys::unwrap_ec_point(concat({{0x04, 0x20}, point}), ed25519) == point);
}

TEST_CASE("a compressed point is accepted in both forms", "[ec_point]") {
  Bytes point(33, 0x33);
  point[0] = 0x03;
  const auto& p256 = curve(NID_X9_62_prime256v1);
  CHECK(keys::unwrap_ec_point(point, p256) == point);
  CHECK(keys::unwrap_ec_point(concat({{0x04, 0x21}, point}), p256) == point);
}

TEST_CASE("malformed CKA_EC_POINT values are refused", "[ec_point]") {
  const auto& p256 = curve(NID_X9_62_prime256v1);
  const Bytes point = fake_point(32);
  CHECK_FALSE(keys::unwrap_ec_point(Bytes{}, p256));
  CHECK_FALSE(keys::unwrap_ec_point(Bytes(64, 0x04), p256));  // one byte short
  CHECK_FALSE(keys::unwrap_ec_point(concat({{0x04, 0x41}, point, {0x00}}), p256));  // trailing
  CHECK_FALSE(keys::unwrap_ec_point(concat({{0x04, 0x42}, point}), p256));          // bad length
  CHECK_FALSE(keys::unwrap_ec_point(concat({{0x04, 0x41}, fake_point(32)}),  // P-521 wants 133
                                    curve(NID_secp521r1)));
  Bytes wrong_tag = point;
  wrong_tag[0] = 0x05;
  CHECK_FALSE(keys::unwrap_ec_point(wrong_tag, p256));
  // A DER-wrapped point of the wrong curve size.
  CHECK_FALSE(keys::unwrap_ec_point(concat({{0x04, 0x61}, fake_point(48)}), p256));
}

TEST_CASE("CKA_EC_PARAMS: named curve OIDs", "[ec_params]") {
  struct Case {
    Bytes der;
    int nid;
  };
  const std::vector<Case> cases = {
      {{0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07}, NID_X9_62_prime256v1},
      {{0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22}, NID_secp384r1},
      {{0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23}, NID_secp521r1},
      {{0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A}, NID_secp256k1},
      {{0x06, 0x03, 0x2B, 0x65, 0x70}, NID_ED25519},  // 1.3.101.112 (RFC 8410)
  };
  for (const auto& c : cases) {
    const keys::Curve* parsed = keys::parse_ec_params(c.der);
    REQUIRE(parsed != nullptr);
    CHECK(parsed->nid == c.nid);
    // What the agent writes when it generates a key is the same DER.
    CHECK(keys::ec_params_der(*parsed) == c.der);
  }
}

TEST_CASE("CKA_EC_PARAMS: PrintableString \"edwards25519\" names Ed25519", "[ec_params]") {
  const Bytes der = {0x13, 0x0C, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9'};
  const keys::Curve* parsed = keys::parse_ec_params(der);
  REQUIRE(parsed != nullptr);
  CHECK(parsed->nid == NID_ED25519);
  CHECK(parsed->key_type == keys::KeyType::kEdwards);
}

TEST_CASE("CKA_EC_PARAMS: unknown or malformed values name no curve", "[ec_params]") {
  // brainpoolP256r1 (1.3.36.3.3.2.8.1.1.7): a real curve the agent does not support.
  CHECK(keys::parse_ec_params(
            Bytes{0x06, 0x09, 0x2B, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07}) == nullptr);
  CHECK(keys::parse_ec_params(Bytes{0x13, 0x05, 'c', 'u', 'r', 'v', 'e'}) == nullptr);
  CHECK(keys::parse_ec_params(Bytes{}) == nullptr);
  CHECK(keys::parse_ec_params(Bytes{0x06, 0x08, 0x2A, 0x86}) == nullptr);              // truncated
  CHECK(keys::parse_ec_params(Bytes{0x06, 0x03, 0x2B, 0x65, 0x70, 0x00}) == nullptr);  // trailing
  CHECK(keys::parse_ec_params(Bytes{0x05, 0x00}) == nullptr);  // NULL (implicitlyCA)
}

TEST_CASE("ECDSA: a full-length r||s is left as it is", "[ecdsa]") {
  Bytes sig(64);
  std::iota(sig.begin(), sig.end(), std::uint8_t{1});
  const Bytes before = sig;
  REQUIRE(keys::normalize_ecdsa_signature(sig, 32));
  CHECK(sig == before);
}

TEST_CASE("ECDSA: halves with dropped leading zeros are padded back", "[ecdsa]") {
  // P-256: r and s each lost their leading zero byte; the token returned 62 bytes.
  Bytes r(31, 0xAA), s(31, 0xBB);
  Bytes sig = concat({r, s});
  sig.reserve(keys::max_ecdsa_der_bytes(32));
  REQUIRE(keys::normalize_ecdsa_signature(sig, 32));
  REQUIRE(sig.size() == 64);
  CHECK(sig == concat({{0x00}, r, {0x00}, s}));

  // P-521 from a token that sized the halves as 65 bytes: 130 -> 132.
  Bytes r521(65, 0x01), s521(65, 0x02);
  Bytes sig521 = concat({r521, s521});
  REQUIRE(keys::normalize_ecdsa_signature(sig521, 66));
  REQUIRE(sig521.size() == 132);
  CHECK(sig521 == concat({{0x00}, r521, {0x00}, s521}));
}

TEST_CASE("ECDSA: a DER signature from the token becomes r||s", "[ecdsa]") {
  // r = 0x80 0x01 ... (high bit set: DER adds a 0x00), s = 0x00 0x7F ... (a leading zero byte).
  Bytes raw(64, 0x22);
  raw[0] = 0x80;
  raw[32] = 0x00;
  raw[33] = 0x7F;
  const auto der = hsm::common::ecdsa_raw_to_der(raw, 32);
  REQUIRE(der);
  CHECK((*der)[0] == 0x30);
  Bytes sig = *der;
  REQUIRE(keys::normalize_ecdsa_signature(sig, 32));
  CHECK(sig == raw);
}

TEST_CASE("ECDSA: raw <-> DER round trips agree with OpenSSL", "[ecdsa]") {
  Bytes raw(132);
  for (std::size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<std::uint8_t>(i * 7 + 3);
  raw[0] = 0x01;  // P-521: r < 2^521
  raw[66] = 0x00;
  const auto der = hsm::common::ecdsa_raw_to_der(raw, 66);
  REQUIRE(der);
  // OpenSSL parses it and sees the same r and s.
  const unsigned char* cursor = der->data();
  ECDSA_SIG* parsed = d2i_ECDSA_SIG(nullptr, &cursor, static_cast<long>(der->size()));
  REQUIRE(parsed != nullptr);
  Bytes r(66), s(66);
  BN_bn2binpad(ECDSA_SIG_get0_r(parsed), r.data(), 66);
  BN_bn2binpad(ECDSA_SIG_get0_s(parsed), s.data(), 66);
  ECDSA_SIG_free(parsed);
  CHECK(concat({r, s}) == raw);
  CHECK(hsm::common::ecdsa_der_to_raw(*der, 66) == raw);
}

TEST_CASE("ECDSA: malformed signatures are refused", "[ecdsa]") {
  Bytes odd(63, 0x11);
  CHECK_FALSE(keys::normalize_ecdsa_signature(odd, 32));
  Bytes too_long(66, 0x11);
  CHECK_FALSE(keys::normalize_ecdsa_signature(too_long, 32));
  Bytes empty;
  CHECK_FALSE(keys::normalize_ecdsa_signature(empty, 32));
  CHECK_FALSE(hsm::common::ecdsa_raw_to_der(Bytes(63, 1), 32));
  // DER with trailing garbage, and DER whose r does not fit the curve.
  auto der = hsm::common::ecdsa_raw_to_der(Bytes(64, 0x42), 32);
  REQUIRE(der);
  Bytes trailing = concat({*der, {0x00}});
  CHECK_FALSE(hsm::common::ecdsa_der_to_raw(trailing, 32));
  auto big = hsm::common::ecdsa_raw_to_der(Bytes(96, 0x42), 48);
  REQUIRE(big);
  CHECK_FALSE(hsm::common::ecdsa_der_to_raw(*big, 32));
}
