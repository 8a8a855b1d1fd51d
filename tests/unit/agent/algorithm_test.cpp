// The algorithm table and the mechanism selection, without a token.
#include "keys/algorithm.hpp"

#include <openssl/evp.h>

#include <catch2/catch.hpp>
#include <set>

#include "keys/algorithm_support.hpp"

namespace keys = hsm::agent::keys;

TEST_CASE("the algorithm table covers every JOSE alg of issue 3 with the right sizes",
          "[algorithm]") {
  struct Expected {
    const char* name;
    std::size_t digest;
    std::size_t signature;  // 0: RSA (modulus length)
  };
  const std::vector<Expected> expected = {
      {"ES256", 32, 64}, {"ES384", 48, 96}, {"ES512", 64, 132}, {"ES256K", 32, 64},
      {"RS256", 32, 0},  {"RS384", 48, 0},  {"RS512", 64, 0},   {"PS256", 32, 0},
      {"PS384", 48, 0},  {"PS512", 64, 0},  {"EdDSA", 0, 64},
  };
  CHECK(keys::all_algorithms().size() == expected.size());
  std::set<std::string_view> names;
  for (const auto& e : expected) {
    const keys::Algorithm* alg = keys::find_algorithm(e.name);
    REQUIRE(alg != nullptr);
    names.insert(alg->name);
    CHECK(alg->digest_bytes == e.digest);
    CHECK(alg->signature_bytes == e.signature);
    if (alg->hash != keys::Hash::kNone) {
      CHECK(static_cast<std::size_t>(EVP_MD_get_size(keys::evp_md(alg->hash))) == e.digest);
    }
  }
  CHECK(names.size() == expected.size());
  CHECK(keys::find_algorithm("HS256") == nullptr);
  CHECK(keys::find_algorithm("es256") == nullptr);
}

TEST_CASE("DigestInfo prefixes built by OpenSSL match RFC 8017 section 9.2", "[algorithm]") {
  using B = std::vector<std::uint8_t>;
  const auto as_vector = [](std::span<const std::uint8_t> s) { return B(s.begin(), s.end()); };
  CHECK(as_vector(keys::digest_info_prefix(keys::Hash::kSha256)) ==
        B{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
          0x05, 0x00, 0x04, 0x20});
  CHECK(as_vector(keys::digest_info_prefix(keys::Hash::kSha384)) ==
        B{0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
          0x05, 0x00, 0x04, 0x30});
  CHECK(as_vector(keys::digest_info_prefix(keys::Hash::kSha512)) ==
        B{0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
          0x05, 0x00, 0x04, 0x40});
}

TEST_CASE("compute_digest matches a one-shot OpenSSL digest", "[algorithm]") {
  const std::vector<std::uint8_t> data = {'a', 'b', 'c'};
  std::array<std::uint8_t, EVP_MAX_MD_SIZE> ours{};
  std::array<std::uint8_t, EVP_MAX_MD_SIZE> reference{};
  for (const keys::Hash hash : {keys::Hash::kSha256, keys::Hash::kSha384, keys::Hash::kSha512}) {
    const std::size_t length = keys::compute_digest(hash, data, ours);
    unsigned int reference_length = 0;
    REQUIRE(EVP_Digest(data.data(), data.size(), reference.data(), &reference_length,
                       keys::evp_md(hash), nullptr) == 1);
    REQUIRE(length == reference_length);
    CHECK(std::equal(ours.begin(), ours.begin() + static_cast<long>(length), reference.begin()));
  }
}

TEST_CASE("mechanism selection: digest-then-sign when no combined mechanism is listed",
          "[algorithm]") {
  // SoftHSMv2's situation for ECDSA: CKM_ECDSA but no CKM_ECDSA_SHA*.
  const auto support = keys::AlgorithmSupport::from_mechanisms(
      {CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS});
  const auto& es384 = support.plan(*keys::find_algorithm("ES384"));
  CHECK(es384.supported);
  CHECK(es384.can_generate);
  CHECK(es384.digest_mechanism == CKM_ECDSA);
  CHECK(es384.message_mechanism == keys::kNoMechanism);
  const auto& rs256 = support.plan(*keys::find_algorithm("RS256"));
  CHECK(rs256.supported);
  CHECK(rs256.digest_mechanism == CKM_RSA_PKCS);
  CHECK_FALSE(support.plan(*keys::find_algorithm("PS256")).supported);  // no CKM_RSA_PKCS_PSS
  CHECK_FALSE(support.plan(*keys::find_algorithm("EdDSA")).supported);
  CHECK(support.default_name() == "ES256");
}

TEST_CASE("mechanism selection: combined mechanisms are preferred for whole messages",
          "[algorithm]") {
  const auto support = keys::AlgorithmSupport::from_mechanisms(
      {CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_ECDSA_SHA384, CKM_SHA256_RSA_PKCS_PSS});
  const auto& es384 = support.plan(*keys::find_algorithm("ES384"));
  CHECK(es384.message_mechanism == CKM_ECDSA_SHA384);
  CHECK(es384.digest_mechanism == CKM_ECDSA);
  const auto& ps256 = support.plan(*keys::find_algorithm("PS256"));
  CHECK(ps256.supported);
  CHECK_FALSE(ps256.can_generate);  // no CKM_RSA_PKCS_KEY_PAIR_GEN
  CHECK(ps256.message_mechanism == CKM_SHA256_RSA_PKCS_PSS);
  CHECK(ps256.digest_mechanism == keys::kNoMechanism);
}

TEST_CASE("mechanism selection: a curve the token rejected is not supported", "[algorithm]") {
  const keys::Curve* k1 = keys::find_algorithm("ES256K")->curve;
  const auto support = keys::AlgorithmSupport::from_mechanisms(
      {CKM_EC_KEY_PAIR_GEN, CKM_ECDSA, CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA}, {k1});
  CHECK_FALSE(support.plan(*keys::find_algorithm("ES256K")).supported);
  CHECK(support.plan(*keys::find_algorithm("ES256")).supported);
  const auto& eddsa = support.plan(*keys::find_algorithm("EdDSA"));
  CHECK(eddsa.supported);
  CHECK(eddsa.message_mechanism == CKM_EDDSA);
  const auto names = support.supported_names();
  CHECK(names == std::vector<std::string>{"ES256", "ES384", "ES512", "EdDSA"});
}

TEST_CASE("mechanism selection: the default alg falls back to the first supported one",
          "[algorithm]") {
  const auto support = keys::AlgorithmSupport::from_mechanisms({CKM_RSA_PKCS_PSS});
  CHECK(support.default_name() == "PS256");
  CHECK(keys::AlgorithmSupport::from_mechanisms({}).default_name().empty());
}
