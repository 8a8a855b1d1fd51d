// KeyService against a real SoftHSMv2 token: every alg end to end, checked with OpenSSL against
// the SPKI and the JWK the agent returned; every error code reachable from the HSM side.
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <mutex>
#include <thread>

#include "fixtures/openssl_check.hpp"
#include "keys/algorithm.hpp"
#include "pkcs11/module.hpp"
#include "pkcs11/token.hpp"
#include "service_fixture.hpp"

using namespace hsm::agent;
namespace protocol = hsm::protocol;
using Bytes = hsm::protocol::Bytes;
using hsm::agent::test::bytes_of;
using hsm::agent::test::OpenService;
using hsm::test::SoftHsmToken;
using protocol::ErrorCode;
using protocol::Method;

namespace {

const std::vector<std::string> kAllAlgs = {"ES256", "ES384", "ES512", "ES256K", "RS256", "RS384",
                                           "RS512", "PS256", "PS384", "PS512",  "EdDSA"};

Bytes digest_of(const keys::Algorithm& alg, const Bytes& data) {
  const EVP_MD* md = nullptr;
  switch (alg.hash) {
    case keys::Hash::kSha256:
      md = EVP_sha256();
      break;
    case keys::Hash::kSha384:
      md = EVP_sha384();
      break;
    case keys::Hash::kSha512:
      md = EVP_sha512();
      break;
    case keys::Hash::kNone:
      break;
  }
  REQUIRE(md != nullptr);
  Bytes digest(EVP_MAX_MD_SIZE);
  unsigned int length = 0;
  REQUIRE(EVP_Digest(data.data(), data.size(), digest.data(), &length, md, nullptr) == 1);
  digest.resize(length);
  return digest;
}

protocol::SignParams sign_params(const std::string& kid, std::optional<Bytes> data,
                                 std::optional<Bytes> digest,
                                 std::optional<std::string> alg = std::nullopt,
                                 std::optional<protocol::SignatureFormat> format = std::nullopt) {
  protocol::SignInput input = digest ? protocol::SignInput{protocol::Digest{std::move(*digest)}}
                                     : protocol::SignInput{protocol::Data{std::move(*data)}};
  return protocol::SignParams{kid, std::move(input), std::move(alg), format};
}

std::uint64_t calls_of(OpenService& svc, const std::string& function) {
  return static_cast<std::uint64_t>(
      svc.metrics().pkcs11_calls_total.Add({{"function", function}}).Value());
}

}  // namespace

TEST_CASE("capabilities list every alg SoftHSMv2 can do, and health touches the token",
          "[service]") {
  SoftHsmToken token("caps");
  OpenService svc(token);
  const auto& caps = svc.service().capabilities();
  CHECK(caps.protocol == 1);
  CHECK(caps.supported_algs == kAllAlgs);
  CHECK(caps.default_alg == "ES256");
  CHECK(caps.can_create);
  CHECK(caps.can_delete);
  CHECK_FALSE(caps.can_import);
  // capabilities is answered in one place, the server (which adds its transport limits to
  // this description): execute() refuses it as a bug in the caller.
  const protocol::Error refused = svc.error(Method::kCapabilities, protocol::EmptyParams{});
  CHECK(refused.code == protocol::ErrorCode::kInternal);
  CHECK(refused.message.find("server") != std::string::npos);

  const auto before = calls_of(svc, "C_GetTokenInfo");
  const auto health = svc.ok<protocol::HealthResult>(Method::kHealth, protocol::EmptyParams{});
  CHECK(health.ok);
  CHECK(health.latency_ms >= 0.0);
  CHECK_FALSE(health.error);
  CHECK(health.token.label == "caps");
  CHECK(health.token.manufacturer == "SoftHSM project");
  CHECK(calls_of(svc, "C_GetTokenInfo") == before + 1);
  CHECK(svc.service().token_status().up);
}

TEST_CASE("every alg: generate, sign data and digest, verify with OpenSSL", "[service][algs]") {
  SoftHsmToken token("algs");
  OpenService svc(token);
  for (const std::string& name : kAllAlgs) {
    DYNAMIC_SECTION(name) {
      const keys::Algorithm& alg = *keys::find_algorithm(name);
      const std::string kid = "key-" + name;
      const auto generated = svc.generate(kid, name);
      CHECK(generated.kid == kid);
      CHECK(generated.alg == name);
      CHECK(generated.jwk.at("kid") == kid);
      CHECK(generated.jwk.at("alg") == name);
      CHECK(generated.jwk.at("use") == "sig");
      CHECK(generated.jwk.count("d") == 0);

      const auto published = svc.public_key(kid);
      CHECK(published.kid == kid);
      // The token records the generation alg (CKA_ALLOWED_MECHANISMS): RSA keys included.
      CHECK(published.alg == name);
      CHECK(published.jwk.at("alg") == name);
      CHECK(hsm::test::spki_from_jwk(published.jwk) == published.spki);

      const Bytes data = bytes_of("the payload signed with " + name);
      const Bytes signature = svc.sign_data(kid, data, name);
      CHECK(signature.size() == (alg.signature_bytes != 0 ? alg.signature_bytes : 256));
      CHECK(hsm::test::verify_with_spki(published.spki, name, data, signature));
      CHECK(hsm::test::verify_with_jwk(published.jwk, name, data, signature));
      CHECK(svc.verify_data(kid, data, signature, name));

      Bytes tampered = signature;
      tampered[tampered.size() / 2] ^= 0x01;
      CHECK_FALSE(svc.verify_data(kid, data, tampered, name));
      CHECK_FALSE(hsm::test::verify_with_spki(published.spki, name, data, tampered));
      CHECK_FALSE(svc.verify_data(kid, bytes_of("another payload"), signature, name));

      if (alg.hash != keys::Hash::kNone) {
        // A digest computed by the caller signs the same message.
        const Bytes digest = digest_of(alg, data);
        const auto result = svc.ok<protocol::SignResult>(
            Method::kSign, sign_params(kid, std::nullopt, digest, name));
        CHECK(result.alg == name);
        CHECK(hsm::test::verify_with_spki(published.spki, name, data, result.signature));
        const auto verified = svc.ok<protocol::VerifyResult>(
            Method::kVerify, protocol::VerifyParams{kid, protocol::Digest{digest}, result.signature,
                                                    name, std::nullopt});
        CHECK(verified.valid);
        // A digest of the wrong length.
        Bytes short_digest(digest.begin(), digest.end() - 1);
        CHECK(svc.error(Method::kSign, sign_params(kid, std::nullopt, short_digest, name)).code ==
              ErrorCode::kInvalidParams);
      } else {
        CHECK(svc.error(Method::kSign, sign_params(kid, std::nullopt, Bytes(32, 1), name)).code ==
              ErrorCode::kInvalidParams);
      }
    }
  }
}

TEST_CASE("ES512: hundreds of signatures are all 132 bytes and verify", "[service][algs]") {
  SoftHsmToken token("es512");
  OpenService svc(token);
  svc.generate("p521", "ES512");
  const auto published = svc.public_key("p521");
  int halves_with_leading_zero = 0;
  for (int i = 0; i < 200; ++i) {
    const Bytes data = bytes_of("message " + std::to_string(i));
    const Bytes signature = svc.sign_data("p521", data);
    REQUIRE(signature.size() == 132);
    REQUIRE(hsm::test::verify_with_spki(published.spki, "ES512", data, signature));
    halves_with_leading_zero += (signature[0] == 0 ? 1 : 0) + (signature[66] == 0 ? 1 : 0);
  }
  // About half of P-521's r and s values fit in 65 bytes: the padding was exercised.
  CHECK(halves_with_leading_zero > 0);
}

TEST_CASE("ECDSA signatures in DER form on request", "[service][algs]") {
  SoftHsmToken token("der");
  OpenService svc(token);
  svc.generate("ec", "ES384");
  const auto published = svc.public_key("ec");
  const Bytes data = bytes_of("der please");
  const auto der = svc.ok<protocol::SignResult>(
      Method::kSign,
      sign_params("ec", data, std::nullopt, std::nullopt, protocol::SignatureFormat::kDer));
  // OpenSSL parses it as one ECDSA-Sig-Value and verifies it with the SPKI.
  const unsigned char* cursor = der.signature.data();
  ECDSA_SIG* parsed = d2i_ECDSA_SIG(nullptr, &cursor, static_cast<long>(der.signature.size()));
  REQUIRE(parsed != nullptr);
  ECDSA_SIG_free(parsed);
  CHECK(cursor == der.signature.data() + der.signature.size());
  const unsigned char* spki = published.spki.data();
  EVP_PKEY* pkey = d2i_PUBKEY(nullptr, &spki, static_cast<long>(published.spki.size()));
  REQUIRE(pkey != nullptr);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  REQUIRE(EVP_DigestVerifyInit(ctx, nullptr, EVP_sha384(), nullptr, pkey) == 1);
  CHECK(EVP_DigestVerify(ctx, der.signature.data(), der.signature.size(), data.data(),
                         data.size()) == 1);
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(pkey);

  // verify takes the same format; a DER signature is not a valid raw one.
  CHECK(
      svc.ok<protocol::VerifyResult>(
             Method::kVerify, protocol::VerifyParams{"ec", protocol::Data{data}, der.signature,
                                                     std::nullopt, protocol::SignatureFormat::kDer})
          .valid);
  CHECK_FALSE(svc.verify_data("ec", data, der.signature));
  // der is for ECDSA only.
  svc.generate("ed", "EdDSA");
  CHECK(svc.error(Method::kSign, sign_params("ed", data, std::nullopt, std::nullopt,
                                             protocol::SignatureFormat::kDer))
            .code == ErrorCode::kInvalidParams);
}

TEST_CASE("an agent-made key signs only with the alg it was generated for", "[service][algs]") {
  SoftHsmToken token("rsa-algs");
  OpenService svc(token);
  svc.generate("rsa", "PS256");
  svc.generate("p256", "ES256");
  const auto published = svc.public_key("rsa");
  const Bytes data = bytes_of("one key, one alg");
  // Its alg is the default, for data and for a digest.
  const auto by_default =
      svc.ok<protocol::SignResult>(Method::kSign, sign_params("rsa", data, std::nullopt));
  CHECK(by_default.alg == "PS256");
  CHECK(hsm::test::verify_with_spki(published.spki, "PS256", data, by_default.signature));
  const auto by_digest = svc.ok<protocol::SignResult>(
      Method::kSign, sign_params("rsa", std::nullopt, hsm::test::sha256(data), "PS256"));
  CHECK(hsm::test::verify_with_spki(published.spki, "PS256", data, by_digest.signature));
  // Every other RSA alg is a clear unsupported_alg (the agent refuses before the token would),
  // for sign and verify alike.
  for (const char* name : {"RS256", "RS384", "RS512", "PS384", "PS512"}) {
    INFO(name);
    const auto error = svc.error(Method::kSign, sign_params("rsa", data, std::nullopt, name));
    CHECK(error.code == ErrorCode::kUnsupportedAlg);
    CHECK(error.message.find("is a PS256 key") != std::string::npos);
    CHECK(error.message.find(name) != std::string::npos);
    CHECK(svc.error(Method::kVerify,
                    protocol::VerifyParams{"rsa", protocol::Data{data}, by_default.signature,
                                           std::string{name}, std::nullopt})
              .code == ErrorCode::kUnsupportedAlg);
  }

  CHECK(svc.error(Method::kSign, sign_params("rsa", data, std::nullopt, "ES256")).code ==
        ErrorCode::kUnsupportedAlg);
  CHECK(svc.error(Method::kSign, sign_params("p256", data, std::nullopt, "ES384")).code ==
        ErrorCode::kUnsupportedAlg);
  CHECK(svc.error(Method::kSign, sign_params("p256", data, std::nullopt, "HS256")).code ==
        ErrorCode::kUnsupportedAlg);
  CHECK(svc.error(Method::kVerify, protocol::VerifyParams{"p256", protocol::Data{data}, Bytes(64),
                                                          "RS256", std::nullopt})
            .code == ErrorCode::kUnsupportedAlg);
}

TEST_CASE("RSA key sizes: rsa_bits 3072, and invalid rsa_bits", "[service][algs]") {
  SoftHsmToken token("rsa-bits");
  OpenService svc(token);
  const auto generated = svc.ok<protocol::KeyDescription>(
      Method::kGenerateKey, protocol::GenerateKeyParams{"rsa3072", "RS384", 3072});
  CHECK(hsm::test::base64url_decode(generated.jwk.at("n")).size() == 384);
  CHECK(svc.sign_data("rsa3072", bytes_of("x")).size() == 384);
  CHECK(
      svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"rsa1024", "RS256", 1024}).code ==
      ErrorCode::kInvalidParams);
  CHECK(
      svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"ec-bits", "ES256", 2048}).code ==
      ErrorCode::kInvalidParams);
  CHECK(
      svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"bad-alg", "HS256", std::nullopt})
          .code == ErrorCode::kUnsupportedAlg);
}

TEST_CASE("generate_key defaults to ES256 and never makes a second key with one kid",
          "[service][keys]") {
  SoftHsmToken token("dupes");
  OpenService svc(token);
  const auto first = svc.ok<protocol::KeyDescription>(
      Method::kGenerateKey, protocol::GenerateKeyParams{"dup", std::nullopt, std::nullopt});
  CHECK(first.alg == "ES256");
  CHECK(first.jwk.at("crv") == "P-256");
  const auto again =
      svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"dup", "ES384", std::nullopt});
  CHECK(again.code == ErrorCode::kAlreadyExists);
  CHECK(svc.public_key("dup").jwk == first.jwk);
}

TEST_CASE("concurrent generate_key calls for one kid: exactly one creates it", "[service][keys]") {
  SoftHsmToken token("race");
  OpenService svc(token, {.read_only = false, .sessions = 4});
  for (int round = 0; round < 5; ++round) {
    const std::string kid = "raced-" + std::to_string(round);
    std::atomic<int> created{0};
    std::atomic<int> refused{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        protocol::Request request;
        request.method = Method::kGenerateKey;
        request.params = protocol::GenerateKeyParams{kid, "ES256", std::nullopt};
        const Outcome outcome = svc.service().execute(
            request, std::chrono::steady_clock::now() + std::chrono::seconds(5));
        if (std::holds_alternative<protocol::Result>(outcome)) {
          ++created;
        } else if (std::get<protocol::Error>(outcome).code == ErrorCode::kAlreadyExists) {
          ++refused;
        }
      });
    }
    for (auto& thread : threads) thread.join();
    CHECK(created == 1);
    CHECK(refused == 3);
  }
  // And the token holds one private key per kid (list_keys would refuse an ambiguous one).
  const auto listed = svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
  CHECK(listed.keys.size() == 5);
}

TEST_CASE("delete_key removes both objects: deleted true, then false, then not_found",
          "[service][keys]") {
  SoftHsmToken token("delete");
  OpenService svc(token);
  svc.generate("gone", "ES256");
  (void)svc.sign_data("gone", bytes_of("cached"));  // the handles are cached now
  CHECK(svc.ok<protocol::DeleteKeyResult>(Method::kDeleteKey, protocol::KidParams{"gone"}).deleted);
  CHECK_FALSE(
      svc.ok<protocol::DeleteKeyResult>(Method::kDeleteKey, protocol::KidParams{"gone"}).deleted);
  CHECK(svc.error(Method::kSign, sign_params("gone", bytes_of("x"), std::nullopt)).code ==
        ErrorCode::kNotFound);
  CHECK(svc.error(Method::kGetPublicKey, protocol::KidParams{"gone"}).code == ErrorCode::kNotFound);
  // Neither object is left on the token.
  std::string output;
  REQUIRE(hsm::agent::test::run_pkcs11_tool(
              {"--login", "--pin", token.user_pin(), "--list-objects"}, output) == 0);
  CHECK(output.find("gone") == std::string::npos);
  // The kid can be used again.
  svc.generate("gone", "EdDSA");
  CHECK(svc.public_key("gone").alg == "EdDSA");
}

TEST_CASE("list_keys is sorted by kid and get_jwks publishes every key", "[service][keys]") {
  SoftHsmToken token("listing");
  OpenService svc(token);
  CHECK(svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{}).keys.empty());
  svc.generate("charlie", "ES256");
  svc.generate("alpha", "EdDSA");
  svc.generate("bravo", "RS256");
  const auto listed = svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
  REQUIRE(listed.keys.size() == 3);
  CHECK(listed.keys[0].kid == "alpha");
  CHECK(listed.keys[0].alg == "EdDSA");
  CHECK(listed.keys[1].kid == "bravo");
  CHECK(listed.keys[2].kid == "charlie");
  CHECK(listed.keys[2].jwk == svc.public_key("charlie").jwk);
  const auto jwks = svc.ok<protocol::JwksResult>(Method::kGetJwks, protocol::EmptyParams{});
  REQUIRE(jwks.keys.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) CHECK(jwks.keys[i] == listed.keys[i].jwk);
}

TEST_CASE("sign_batch: each item succeeds or fails on its own, in order", "[service][sign]") {
  SoftHsmToken token("batch");
  OpenService svc(token);
  svc.generate("a", "ES256");
  svc.generate("b", "EdDSA");
  const Bytes data = bytes_of("batched");
  protocol::SignBatchParams batch;
  batch.items.push_back(sign_params("a", data, std::nullopt));
  batch.items.push_back(sign_params("missing", data, std::nullopt));
  batch.items.push_back(sign_params("b", data, std::nullopt));
  batch.items.push_back(sign_params("a", std::nullopt, Bytes(31, 0)));  // wrong digest length
  batch.items.push_back(sign_params("b", data, std::nullopt, "ES256"));
  const auto result = svc.ok<protocol::SignBatchResult>(Method::kSignBatch, batch);
  REQUIRE(result.results.size() == 5);
  REQUIRE(std::holds_alternative<Bytes>(result.results[0]));
  CHECK(hsm::test::verify_with_spki(svc.public_key("a").spki, "ES256", data,
                                    std::get<Bytes>(result.results[0])));
  REQUIRE(std::holds_alternative<protocol::Error>(result.results[1]));
  CHECK(std::get<protocol::Error>(result.results[1]).code == ErrorCode::kNotFound);
  REQUIRE(std::holds_alternative<Bytes>(result.results[2]));
  CHECK(hsm::test::verify_with_spki(svc.public_key("b").spki, "EdDSA", data,
                                    std::get<Bytes>(result.results[2])));
  CHECK(std::get<protocol::Error>(result.results[3]).code == ErrorCode::kInvalidParams);
  CHECK(std::get<protocol::Error>(result.results[4]).code == ErrorCode::kUnsupportedAlg);
}

TEST_CASE("the signing path: one C_SignInit and one C_Sign, no C_FindObjects once cached",
          "[service][sign]") {
  SoftHsmToken token("hot-path");
  OpenService svc(token);
  svc.generate("hot", "ES256");
  (void)svc.sign_data("hot", bytes_of("warm up"));
  const auto finds = calls_of(svc, "C_FindObjects");
  const auto inits = calls_of(svc, "C_SignInit");
  const auto signs = calls_of(svc, "C_Sign");
  for (int i = 0; i < 10; ++i) (void)svc.sign_data("hot", bytes_of("hot " + std::to_string(i)));
  CHECK(calls_of(svc, "C_FindObjects") == finds);
  CHECK(calls_of(svc, "C_SignInit") == inits + 10);
  CHECK(calls_of(svc, "C_Sign") == signs + 10);
}

TEST_CASE("verify: wrong signatures are valid=false, not errors", "[service][verify]") {
  SoftHsmToken token("verify");
  OpenService svc(token);
  svc.generate("ec", "ES256");
  svc.generate("rsa", "PS512");
  const Bytes data = bytes_of("verify me");
  for (const char* kid : {"ec", "rsa"}) {
    const Bytes good = svc.sign_data(kid, data);
    CHECK(svc.verify_data(kid, data, good));
    CHECK_FALSE(svc.verify_data(kid, data, Bytes{}));
    CHECK_FALSE(svc.verify_data(kid, data, Bytes(good.begin(), good.end() - 1)));
    Bytes longer = good;
    longer.push_back(0);
    CHECK_FALSE(svc.verify_data(kid, data, longer));
    CHECK_FALSE(svc.verify_data(kid, data, Bytes(good.size(), 0xFF)));
  }
  CHECK(svc.error(Method::kVerify, protocol::VerifyParams{"nope", protocol::Data{data}, Bytes(64),
                                                          std::nullopt, std::nullopt})
            .code == ErrorCode::kNotFound);
}

TEST_CASE("import_key is not_supported; unknown kids are not_found", "[service]") {
  SoftHsmToken token("misc");
  OpenService svc(token);
  CHECK(svc.error(Method::kImportKey, protocol::EmptyParams{}).code == ErrorCode::kNotSupported);
  CHECK(svc.error(Method::kSign, sign_params("nobody", bytes_of("x"), std::nullopt)).code ==
        ErrorCode::kNotFound);
  CHECK(svc.error(Method::kGetPublicKey, protocol::KidParams{"nobody"}).code ==
        ErrorCode::kNotFound);
  // Parameters of the wrong shape for the method (the codec prevents this; execute still copes).
  CHECK(svc.error(Method::kSign, protocol::EmptyParams{}).code == ErrorCode::kInvalidParams);
}

TEST_CASE("read-only: existing keys sign; generate and delete are permission_denied",
          "[service][read_only]") {
  SoftHsmToken token("read-only");
  Bytes spki;
  {
    OpenService writer(token);
    writer.generate("kept", "ES256");
    spki = writer.public_key("kept").spki;
  }
  OpenService svc(token, {.read_only = true, .sessions = 2});
  const auto& caps = svc.service().capabilities();
  CHECK_FALSE(caps.can_create);
  CHECK_FALSE(caps.can_delete);
  CHECK(caps.supported_algs == kAllAlgs);
  CHECK(svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"new", "ES256", std::nullopt})
            .code == ErrorCode::kPermissionDenied);
  CHECK(svc.error(Method::kDeleteKey, protocol::KidParams{"kept"}).code ==
        ErrorCode::kPermissionDenied);
  const Bytes data = bytes_of("read-only signing");
  CHECK(hsm::test::verify_with_spki(spki, "ES256", data, svc.sign_data("kept", data)));
  CHECK(svc.public_key("kept").spki == spki);
}

TEST_CASE("after close, execute answers shutting_down", "[service]") {
  SoftHsmToken token("closing");
  OpenService svc(token);
  svc.service().close();
  CHECK(svc.error(Method::kHealth, protocol::EmptyParams{}).code == ErrorCode::kShuttingDown);
}

TEST_CASE("every alg: list_keys and get_jwks report the generated alg, also after a restart",
          "[service][algs][keys]") {
  SoftHsmToken token("recorded-algs");
  const auto check_listing = [](OpenService& svc) {
    const auto listed =
        svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
    const auto jwks = svc.ok<protocol::JwksResult>(Method::kGetJwks, protocol::EmptyParams{});
    REQUIRE(listed.keys.size() == kAllAlgs.size());
    REQUIRE(jwks.keys.size() == kAllAlgs.size());
    for (std::size_t i = 0; i < listed.keys.size(); ++i) {
      const auto& key = listed.keys[i];
      const std::string alg = key.kid.substr(std::string("gen-").size());
      INFO(key.kid);
      CHECK(key.alg == alg);
      CHECK(key.jwk.at("alg") == alg);
      CHECK(jwks.keys[i].at("alg") == alg);
      CHECK(svc.public_key(key.kid).alg == alg);
    }
  };
  {
    OpenService svc(token);
    for (const std::string& name : kAllAlgs) svc.generate("gen-" + name, name);
    check_listing(svc);
  }
  // A fresh agent reads the alg back from the token alone.
  OpenService restarted(token);
  check_listing(restarted);
}

TEST_CASE("keys made and deleted while other threads sign and look keys up: every call succeeds",
          "[service][keys][object_changes]") {
  // SoftHSMv2 2.6.1 (Debian bookworm) re-reads its token directory on object access and can
  // pick up a key's object file while another thread is still creating it (SoftHSMv2 issue
  // 573): C_GenerateKeyPair then fails with CKR_TEMPLATE_INCONSISTENT or CKR_GENERAL_ERROR.
  // The agent serialises object changes on such a token; this is the load that shows it.
  SoftHsmToken token("object-changes");
  OpenService svc(token, {.read_only = false, .sessions = 4});
  svc.generate("steady", "ES256");
  const Bytes payload = bytes_of("payload");
  constexpr int kKeys = 40;
  std::atomic<bool> done{false};
  std::atomic<int> made{0};
  std::vector<std::string> failures;
  std::mutex failures_mutex;
  auto record = [&](const Outcome& outcome, const std::string& what) {
    if (const auto* error = std::get_if<protocol::Error>(&outcome)) {
      std::lock_guard lock(failures_mutex);
      failures.push_back(what + ": " + error->message);
    }
  };
  auto run = [&](protocol::Method method, protocol::Params params) {
    protocol::Request request;
    request.method = method;
    request.params = std::move(params);
    return svc.service().execute(request,
                                 std::chrono::steady_clock::now() + std::chrono::seconds(30));
  };
  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // the key maker: generate, then delete every other one
    for (int i = 0; i < kKeys; ++i) {
      const std::string kid = "made-" + std::to_string(i);
      record(run(Method::kGenerateKey, protocol::GenerateKeyParams{kid, "ES256", std::nullopt}),
             "generate " + kid);
      made.store(i + 1);
      if (i % 2 == 1) {
        record(run(Method::kDeleteKey, protocol::KidParams{kid}), "delete " + kid);
      }
    }
    done.store(true);
  });
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {  // signers, and readers of the newest keys
      while (!done.load()) {
        record(run(Method::kSign, sign_params("steady", payload, std::nullopt)), "sign steady");
        const int newest = made.load() - 1;
        if (t == 0 && newest >= 0 && newest % 2 == 0) {
          record(run(Method::kGetPublicKey, protocol::KidParams{"made-" + std::to_string(newest)}),
                 "get_public_key");
        }
        if (t == 1) record(run(Method::kListKeys, protocol::EmptyParams{}), "list_keys");
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& failure : failures) UNSCOPED_INFO(failure);
  CHECK(failures.empty());
  // Every kept key is there exactly once, and no deleted one is left behind.
  const auto listed = svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
  CHECK(listed.keys.size() == 1 + kKeys / 2);
}

TEST_CASE("object changes run alone on SoftHSMv2 by default, and as configured",
          "[service][object_changes]") {
  protocol::TokenDescription softhsm{
      .label = "t", .manufacturer = "SoftHSM project", .model = "SoftHSM v2", .serial = "1"};
  protocol::TokenDescription other{
      .label = "t", .manufacturer = "Vendor", .model = "HSM 7", .serial = "1"};
  CHECK(pkcs11::needs_serialized_object_changes(softhsm));
  CHECK_FALSE(pkcs11::needs_serialized_object_changes(other));

  SoftHsmToken token("gate-setting");
  const std::pair<ObjectChanges, bool> settings[] = {{ObjectChanges::kAuto, true},
                                                     {ObjectChanges::kSerialized, true},
                                                     {ObjectChanges::kConcurrent, false}};
  for (const auto& [setting, serialized] : settings) {
    OpenService svc(token, {.object_changes = setting});
    const auto generation = svc.token_state().acquire();
    REQUIRE(generation != nullptr);
    CHECK(generation->module->serializes_object_changes() == serialized);
    // Either way the service works.
    svc.generate("k" + std::to_string(static_cast<int>(setting)), "ES256");
  }
}
