// Keys made outside the agent (OpenSC's pkcs11-tool, as an operator or a vendor tool would) are
// usable by kid = CKA_LABEL; keys made by the agent look right to pkcs11-tool; keys deleted or
// re-created behind the agent's back are found afresh.
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "fixtures/openssl_check.hpp"
#include "hsm/protocol/codec.hpp"
#include "service_fixture.hpp"

using namespace hsm::agent;
namespace protocol = hsm::protocol;
using Bytes = hsm::protocol::Bytes;
using hsm::agent::test::bytes_of;
using hsm::agent::test::OpenService;
using hsm::agent::test::run_pkcs11_tool;
using hsm::test::SoftHsmToken;
using protocol::ErrorCode;
using protocol::Method;

namespace {

void pkcs11_tool(const SoftHsmToken& token, std::vector<std::string> args) {
  args.insert(args.begin(), {"--login", "--pin", token.user_pin()});
  std::string output;
  const int status = run_pkcs11_tool(args, output);
  INFO(output);
  REQUIRE(status == 0);
}

void keypairgen(const SoftHsmToken& token, const std::string& key_type, const std::string& label,
                std::optional<std::string> id = std::nullopt) {
  std::vector<std::string> args = {"--keypairgen", "--key-type", key_type, "--label", label};
  if (id) {
    args.push_back("--id");
    args.push_back(*id);
  }
  pkcs11_tool(token, args);
}

// The public key as pkcs11-tool reads it back (DER or PEM, depending on the key type), as
// SPKI DER re-encoded by OpenSSL; nullopt when this pkcs11-tool cannot export the key type.
std::optional<Bytes> read_public_key(const SoftHsmToken& token, const std::string& label) {
  const auto path = token.directory() / ("pub-" + label + ".out");
  std::string output;
  if (run_pkcs11_tool({"--login", "--pin", token.user_pin(), "--read-object", "--type", "pubkey",
                       "--label", label, "-o", path.string()},
                      output) != 0) {
    WARN("pkcs11-tool cannot export " << label << ": " << output);
    return std::nullopt;
  }
  std::ifstream in(path, std::ios::binary);
  const Bytes raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const unsigned char* cursor = raw.data();
  EVP_PKEY* pkey = d2i_PUBKEY(nullptr, &cursor, static_cast<long>(raw.size()));
  if (pkey == nullptr) {
    BIO* bio = BIO_new_mem_buf(raw.data(), static_cast<int>(raw.size()));
    pkey = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
  }
  REQUIRE(pkey != nullptr);
  unsigned char* der = nullptr;
  const int length = i2d_PUBKEY(pkey, &der);
  EVP_PKEY_free(pkey);
  REQUIRE(length > 0);
  Bytes spki(der, der + length);
  OPENSSL_free(der);
  return spki;
}

Bytes read_public_key_der(const SoftHsmToken& token, const std::string& label) {
  auto spki = read_public_key(token, label);
  REQUIRE(spki);
  return *spki;
}

void check_usable(OpenService& svc, const std::string& kid, const std::string& alg) {
  const auto published = svc.public_key(kid);
  CHECK(published.alg == alg);
  CHECK(published.jwk.at("kid") == kid);
  const Bytes data = bytes_of("signed with a key made by pkcs11-tool: " + kid);
  const Bytes signature = svc.sign_data(kid, data);
  CHECK(hsm::test::verify_with_spki(published.spki, alg, data, signature));
  CHECK(hsm::test::verify_with_jwk(published.jwk, alg, data, signature));
}

}  // namespace

TEST_CASE("keys made by pkcs11-tool --keypairgen are usable by their label", "[external]") {
  struct Case {
    const char* key_type;
    const char* alg;
  };
  // EC:edwards25519 makes pkcs11-tool write CKA_EC_PARAMS as the PrintableString
  // "edwards25519"; EC:secp521r1 gives a CKA_EC_POINT with a long-form DER length.
  const std::vector<Case> cases = {
      {"EC:prime256v1", "ES256"}, {"EC:secp384r1", "ES384"}, {"EC:secp521r1", "ES512"},
      {"EC:secp256k1", "ES256K"}, {"RSA:2048", "RS256"},     {"EC:edwards25519", "EdDSA"},
  };
  SoftHsmToken token("external");
  // The agent is already running when the keys appear: they are found on first use.
  OpenService svc(token);
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.key_type) {
      const std::string label = std::string{"X-"} + c.key_type;
      keypairgen(token, c.key_type, label);
      check_usable(svc, label, c.alg);
      // The agent's SPKI is the public key pkcs11-tool reads back (where it can: this OpenSC
      // fails to export P-384 public keys).
      if (const auto exported = read_public_key(token, label)) {
        CHECK(svc.public_key(label).spki == *exported);
      }
    }
  }
}

TEST_CASE("the P-256 key of issue 2's done-when is used as kid X", "[external]") {
  SoftHsmToken token("done-when");
  keypairgen(token, "EC:prime256v1", "X");
  OpenService svc(token);
  check_usable(svc, "X", "ES256");
  const auto listed = svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
  REQUIRE(listed.keys.size() == 1);
  CHECK(listed.keys[0].kid == "X");
}

TEST_CASE("list_keys lists only labels that are valid kids: what it lists, sign accepts",
          "[external]") {
  // One kid rule (protocol::kid_problem): a label that is not well-formed UTF-8 by that rule
  // (an overlong encoding, a UTF-16 surrogate) is not a kid, so list_keys must not offer it.
  // It once had a weaker check of its own, and listed kids that every sign then refused.
  SoftHsmToken token("kid-rule");
  OpenService svc(token);
  keypairgen(token, "EC:prime256v1", "good-kid");
  const std::string overlong = "\xE0\x80\xAF-overlong";  // '/' in three bytes
  const std::string surrogate = "\xED\xA0\x80-surrogate";
  keypairgen(token, "EC:prime256v1", overlong);
  keypairgen(token, "EC:prime256v1", surrogate);
  REQUIRE(protocol::kid_problem(overlong).has_value());
  REQUIRE(protocol::kid_problem(surrogate).has_value());
  const auto listed = svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{});
  std::vector<std::string> kids;
  for (const auto& key : listed.keys) kids.push_back(key.kid);
  CHECK(kids == std::vector<std::string>{"good-kid"});
}

TEST_CASE("keys made by the agent are sensitive and never extractable to pkcs11-tool",
          "[external]") {
  SoftHsmToken token("attributes");
  OpenService svc(token);
  svc.generate("agent-made", "ES256");
  std::string output;
  REQUIRE(
      run_pkcs11_tool({"--login", "--pin", token.user_pin(), "--list-objects", "--type", "privkey"},
                      output) == 0);
  INFO(output);
  CHECK(output.find("label:      agent-made") != std::string::npos);
  CHECK(output.find("sensitive") != std::string::npos);
  CHECK(output.find("never extractable") != std::string::npos);
  CHECK(output.find("ID:         6167656e742d6d616465") != std::string::npos);  // "agent-made"
  // A label pkcs11-tool made cannot be generated over.
  keypairgen(token, "EC:prime256v1", "taken");
  CHECK(svc.error(Method::kGenerateKey, protocol::GenerateKeyParams{"taken", "ES256", std::nullopt})
            .code == ErrorCode::kAlreadyExists);
}

TEST_CASE("an EC public key under another label is found by CKA_ID", "[external]") {
  SoftHsmToken token("by-id");
  keypairgen(token, "EC:prime256v1", "split", "0a0b");
  const Bytes spki = read_public_key_der(token, "split");
  const auto path = token.directory() / "split.der";
  {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(spki.data()),
               static_cast<std::streamsize>(spki.size()));
  }
  pkcs11_tool(token, {"--delete-object", "--type", "pubkey", "--label", "split"});
  pkcs11_tool(token, {"--write-object", path.string(), "--type", "pubkey", "--label",
                      "split-public", "--id", "0a0b"});
  OpenService svc(token);
  check_usable(svc, "split", "ES256");
  CHECK(svc.public_key("split").spki == spki);
}

TEST_CASE("an RSA key without its public object uses the private key's modulus", "[external]") {
  SoftHsmToken token("rsa-private-only");
  keypairgen(token, "RSA:2048", "lonely-rsa");
  const Bytes spki = read_public_key_der(token, "lonely-rsa");
  pkcs11_tool(token, {"--delete-object", "--type", "pubkey", "--label", "lonely-rsa"});
  OpenService svc(token);
  check_usable(svc, "lonely-rsa", "RS256");
  CHECK(svc.public_key("lonely-rsa").spki == spki);
}

TEST_CASE("an EC key without any public key is a clear error, not a crash", "[external]") {
  SoftHsmToken token("ec-private-only");
  keypairgen(token, "EC:prime256v1", "lonely-ec");
  pkcs11_tool(token, {"--delete-object", "--type", "pubkey", "--label", "lonely-ec"});
  OpenService svc(token);
  const auto error = svc.error(Method::kGetPublicKey, protocol::KidParams{"lonely-ec"});
  CHECK(error.code == ErrorCode::kHsmError);
  CHECK(error.message.find("lonely-ec") != std::string::npos);
  // list_keys leaves it out rather than failing.
  CHECK(svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{}).keys.empty());
}

TEST_CASE("a key deleted and re-created behind the agent's back is found afresh", "[external]") {
  SoftHsmToken token("recreated");
  OpenService svc(token);
  svc.generate("swap", "ES256");
  const Bytes old_spki = svc.public_key("swap").spki;
  (void)svc.sign_data("swap", bytes_of("cache the handles"));

  pkcs11_tool(token, {"--delete-object", "--type", "privkey", "--label", "swap"});
  pkcs11_tool(token, {"--delete-object", "--type", "pubkey", "--label", "swap"});
  keypairgen(token, "EC:prime256v1", "swap");
  const Bytes new_spki = read_public_key_der(token, "swap");
  REQUIRE(new_spki != old_spki);

  // The cached handle is stale: the agent drops it, looks the kid up again and signs with the
  // new key, all within the one request.
  const Bytes data = bytes_of("after the swap");
  const Bytes signature = svc.sign_data("swap", data);
  CHECK(hsm::test::verify_with_spki(new_spki, "ES256", data, signature));
  CHECK(svc.public_key("swap").spki == new_spki);
}

TEST_CASE(
    "keys made by the agent record their alg in CKA_ALLOWED_MECHANISMS, which the token "
    "enforces",
    "[external][algs]") {
  SoftHsmToken token("allowed-mechanisms");
  OpenService svc(token);
  svc.generate("pss", "PS256");
  std::string output;
  REQUIRE(run_pkcs11_tool({"--login", "--pin", token.user_pin(), "--list-objects", "--type",
                           "privkey", "--label", "pss"},
                          output) == 0);
  INFO(output);
  CHECK(output.find("Allowed mechanisms: RSA-PKCS-PSS,SHA256-RSA-PKCS-PSS") != std::string::npos);

  // The token itself refuses the key with another scheme, whoever asks (here pkcs11-tool).
  const auto input = token.directory() / "to-sign.bin";
  std::ofstream(input) << "signed outside the agent";
  const auto sign_with = [&](const std::string& mechanism, std::string& out) {
    return run_pkcs11_tool(
        {"--login", "--pin", token.user_pin(), "--sign", "--label", "pss", "-m", mechanism, "-i",
         input.string(), "-o", (token.directory() / "signature.bin").string()},
        out);
  };
  std::string refused;
  CHECK(sign_with("SHA256-RSA-PKCS", refused) != 0);
  CHECK(refused.find("CKR_MECHANISM_INVALID") != std::string::npos);
  std::string accepted;
  CHECK(sign_with("SHA256-RSA-PKCS-PSS", accepted) == 0);
}

TEST_CASE("external RSA keys with CKA_ALLOWED_MECHANISMS: the alg follows from them",
          "[external][algs]") {
  SoftHsmToken token("external-allowed");
  OpenService svc(token);
  const Bytes data = bytes_of("restricted by pkcs11-tool");
  const auto keypairgen_allowing = [&](const std::string& label, const std::string& mechanisms) {
    pkcs11_tool(token, {"--keypairgen", "--key-type", "RSA:2048", "--label", label,
                        "--allowed-mechanisms", mechanisms});
  };

  SECTION("a combined mechanism names one alg") {
    keypairgen_allowing("ps384", "SHA384-RSA-PKCS-PSS,RSA-PKCS-PSS");
    check_usable(svc, "ps384", "PS384");
    CHECK(svc.error(Method::kSign,
                    protocol::SignParams{"ps384", protocol::Data{data}, "PS256", std::nullopt})
              .code == ErrorCode::kUnsupportedAlg);
  }
  SECTION("the scheme alone: any alg of it, PS256 by default") {
    keypairgen_allowing("pss-any", "RSA-PKCS-PSS");
    check_usable(svc, "pss-any", "PS256");
    const auto published = svc.public_key("pss-any");
    CHECK(hsm::test::verify_with_spki(published.spki, "PS512", data,
                                      svc.sign_data("pss-any", data, "PS512")));
    const auto error =
        svc.error(Method::kSign,
                  protocol::SignParams{"pss-any", protocol::Data{data}, "RS256", std::nullopt});
    CHECK(error.code == ErrorCode::kUnsupportedAlg);
  }
  SECTION("only a combined mechanism: data is signed, a digest is not_supported") {
    keypairgen_allowing("rs512", "SHA512-RSA-PKCS");
    check_usable(svc, "rs512", "RS512");
    const auto error = svc.error(
        Method::kSign,
        protocol::SignParams{"rs512", protocol::Digest{Bytes(64, 0x01)}, "RS512", std::nullopt});
    CHECK(error.code == ErrorCode::kNotSupported);
  }
  SECTION("no mechanism the agent signs with: refused, and left out of list_keys") {
    keypairgen_allowing("rsa-x509", "RSA-X-509");
    CHECK(svc.error(Method::kGetPublicKey, protocol::KidParams{"rsa-x509"}).code ==
          ErrorCode::kUnsupportedAlg);
    CHECK(
        svc.ok<protocol::ListKeysResult>(Method::kListKeys, protocol::EmptyParams{}).keys.empty());
  }
}
