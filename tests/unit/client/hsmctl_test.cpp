// hsmctl in-process (run_hsmctl) against the fake agent: outputs, exit codes, usage errors;
// and its encoders (JSON, base64url, hex, PEM).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "encoding.hpp"
#include "fake_agent.hpp"

namespace {

using hsm::protocol::ErrorCode;
using hsm::protocol::Method;
using hsm::test::FakeAgent;
using hsm::test::FakeConnection;

struct Run {
  int code = -1;
  std::string out;
  std::string err;
};

Run hsmctl(const std::string& socket, std::vector<std::string> args) {
  args.insert(args.begin(), {"hsmctl", "--socket", socket});
  std::ostringstream out;
  std::ostringstream err;
  const int code = hsm::hsmctl::run_hsmctl(args, out, err);
  return {code, out.str(), err.str()};
}

Run hsmctl(const FakeAgent& agent, std::vector<std::string> args) {
  return hsmctl(agent.socket_path(), std::move(args));
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

/// A file in the temporary directory, removed at the end of the scope.
struct TempFile {
  std::string path;
  TempFile() {
    std::string pattern = "/tmp/hsmctl-test-XXXXXX";
    const int fd = ::mkstemp(pattern.data());
    REQUIRE(fd >= 0);
    ::close(fd);
    path = pattern;
  }
  ~TempFile() { std::remove(path.c_str()); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  void write(const std::string& content) const { std::ofstream(path, std::ios::binary) << content; }
  [[nodiscard]] std::string read() const {
    std::ifstream file(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(file), {}};
  }
};

std::string base64url(std::string_view text) {
  return hsm::hsmctl::encode_base64url(hsm::hsmctl::Bytes(text.begin(), text.end()));
}

}  // namespace

TEST_CASE("hsmctl health prints text or JSON and exits 1 when not ok", "[hsmctl]") {
  FakeAgent agent;
  auto run = hsmctl(agent, {"health"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, "ok"));
  CHECK(contains(run.out, "token"));

  run = hsmctl(agent, {"--json", "health"});
  CHECK(run.code == 0);
  CHECK(run.out == R"({"ok":true,"latency_ms":0.25,"error":null,"token":{"label":"token",)"
                   R"("manufacturer":"maker","model":"model","serial":"42"}})"
                   "\n");
  // Global flags are accepted after the command too.
  CHECK(hsmctl(agent, {"health", "--json"}).out == run.out);

  FakeAgent sick(
      [](const std::shared_ptr<FakeConnection>& connection, const hsm::protocol::Request& request) {
        connection->answer_result(
            request.msgid, hsm::protocol::HealthResult{false, 1.5, "CKR_DEVICE_REMOVED", {}});
      });
  run = hsmctl(sick, {"health"});
  CHECK(run.code == 1);
  CHECK(contains(run.out, "NOT OK: CKR_DEVICE_REMOVED"));
}

TEST_CASE("hsmctl caps and keys and jwks", "[hsmctl]") {
  FakeAgent agent;
  auto run = hsmctl(agent, {"caps"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, "fake-1.0"));
  CHECK(contains(run.out, "ES256 (default ES256)"));

  run = hsmctl(agent, {"--json", "caps"});
  CHECK(contains(run.out, R"("supported_algs":["ES256"])"));
  CHECK(contains(run.out, R"("max_message_bytes":1048576)"));

  run = hsmctl(agent, {"keys"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, "KID"));
  CHECK(contains(run.out, "a    ES256"));

  run = hsmctl(agent, {"--json", "keys"});
  CHECK(contains(run.out, R"({"keys":[{"kid":"a","alg":"ES256","jwk":{"alg":"ES256")"));

  run = hsmctl(agent, {"jwks"});
  CHECK(run.code == 0);
  CHECK(run.out.rfind(R"({"keys":[{"alg":"ES256","crv":"P-256")", 0) == 0);
}

TEST_CASE("hsmctl gen passes kid and alg and RSA size", "[hsmctl]") {
  FakeAgent agent;
  auto run = hsmctl(agent, {"gen", "rsa-key", "--alg", "RS256", "--rsa-bits", "3072"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, "generated rsa-key (RS256)"));
  const auto requests = agent.requests();
  const auto& params = std::get<hsm::protocol::GenerateKeyParams>(requests.at(0).params);
  CHECK(params.kid == "rsa-key");
  CHECK(params.alg == std::optional<std::string>("RS256"));
  CHECK(params.rsa_bits == std::optional<std::uint32_t>(3072));

  run = hsmctl(agent, {"--json", "gen", "k2"});
  CHECK(run.out.rfind(R"({"kid":"k2","alg":"ES256","jwk":{)", 0) == 0);
}

TEST_CASE("hsmctl sign takes data or digest or file and prints base64url or writes raw bytes",
          "[hsmctl]") {
  FakeAgent agent;  // its "signature" is the signed bytes themselves
  auto run = hsmctl(agent, {"sign", "k", "--data", "hello"});
  CHECK(run.code == 0);
  CHECK(run.out == base64url("hello") + "\n");

  run = hsmctl(agent, {"sign", "k", "--digest", "00:ff:10"});
  CHECK(run.code == 0);
  const auto digest_request = agent.requests().back();
  const auto& digest_params = std::get<hsm::protocol::SignParams>(digest_request.params);
  CHECK(digest_params.input ==
        hsm::protocol::SignInput{hsm::protocol::Digest{hsm::protocol::Bytes{0x00, 0xff, 0x10}}});

  TempFile input;
  input.write(std::string("file\0bytes", 10));
  TempFile output;
  run = hsmctl(agent, {"sign", "k", "--in", input.path, "--out", output.path, "--format", "der",
                       "--alg", "ES256"});
  CHECK(run.code == 0);
  CHECK(run.out.empty());
  CHECK(output.read() == std::string("file\0bytes", 10));
  const auto file_request = agent.requests().back();
  const auto& file_params = std::get<hsm::protocol::SignParams>(file_request.params);
  CHECK(file_params.format == hsm::protocol::SignatureFormat::kDer);
  CHECK(file_params.alg == std::optional<std::string>("ES256"));

  run = hsmctl(agent, {"--json", "sign", "k", "--data", "x"});
  CHECK(run.out == R"({"kid":"k","alg":"ES256","signature":")" + base64url("x") + "\"}\n");
}

TEST_CASE("hsmctl verify exits 0 when valid and 1 when not", "[hsmctl]") {
  FakeAgent agent;  // valid when the signature equals the data
  auto run = hsmctl(agent, {"verify", "k", "--data", "abc", "--sig-b64url", base64url("abc")});
  CHECK(run.code == 0);
  CHECK(run.out == "valid\n");

  run = hsmctl(agent, {"verify", "k", "--data", "abc", "--sig-b64url", base64url("abd")});
  CHECK(run.code == 1);
  CHECK(run.out == "invalid\n");

  TempFile signature;
  signature.write("abc");
  run = hsmctl(agent, {"--json", "verify", "k", "--data", "abc", "--sig-file", signature.path});
  CHECK(run.code == 0);
  CHECK(run.out == "{\"valid\":true}\n");
}

TEST_CASE("hsmctl pubkey prints a JWK or a PEM", "[hsmctl]") {
  FakeAgent agent;
  auto run = hsmctl(agent, {"pubkey", "k"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, R"("kid":"k")"));

  run = hsmctl(agent, {"pubkey", "k", "--format", "pem"});
  CHECK(run.code == 0);
  CHECK(run.out == "-----BEGIN PUBLIC KEY-----\nMAMCAQA=\n-----END PUBLIC KEY-----\n");

  run = hsmctl(agent, {"--json", "pubkey", "k"});
  CHECK(contains(run.out, R"("pem":"-----BEGIN PUBLIC KEY-----\nMAMCAQA=\n)"));
}

TEST_CASE("hsmctl delete exits 1 when there was no such key", "[hsmctl]") {
  FakeAgent agent;  // "present" exists, nothing else does
  auto run = hsmctl(agent, {"delete", "present"});
  CHECK(run.code == 0);
  CHECK(run.out == "deleted present\n");
  run = hsmctl(agent, {"delete", "absent"});
  CHECK(run.code == 1);
  run = hsmctl(agent, {"--json", "delete", "absent"});
  CHECK(run.out == R"({"kid":"absent","deleted":false})"
                   "\n");
}

TEST_CASE("hsmctl exit codes for agent errors and no agent and usage errors", "[hsmctl]") {
  FakeAgent agent(
      [](const std::shared_ptr<FakeConnection>& connection, const hsm::protocol::Request& request) {
        connection->answer_error(request.msgid, ErrorCode::kHsmError, "C_Sign failed",
                                 "CKR_DEVICE_ERROR");
      });
  auto run = hsmctl(agent, {"sign", "k", "--data", "x"});
  CHECK(run.code == 3);
  CHECK(contains(run.err, "hsm_error"));
  CHECK(contains(run.err, "CKR_DEVICE_ERROR"));
  CHECK(run.out.empty());

  run = hsmctl(agent, {"--json", "sign", "k", "--data", "x"});
  CHECK(run.code == 3);
  CHECK(run.err == R"({"error":{"code":"hsm_error","message":"C_Sign failed",)"
                   R"("ckr":"CKR_DEVICE_ERROR"}})"
                   "\n");

  run = hsmctl("/nonexistent/agent.sock", {"health"});
  CHECK(run.code == 4);
  CHECK(contains(run.err, "connection_failed"));

  CHECK(hsmctl(agent, {}).code == 2);                       // no command
  CHECK(hsmctl(agent, {"bogus"}).code == 2);                // unknown command
  CHECK(hsmctl(agent, {"sign", "--data", "x"}).code == 2);  // no kid
  CHECK(hsmctl(agent, {"sign", "k"}).code == 2);            // no input
  CHECK(hsmctl(agent, {"sign", "k", "--data", "x", "--digest", "00"}).code == 2);  // two inputs
  CHECK(hsmctl(agent, {"sign", "k", "--digest", "xyz"}).code == 2);                // bad hex
  CHECK(hsmctl(agent, {"sign", "k", "--in", "/nonexistent/file"}).code == 2);
  CHECK(hsmctl(agent, {"sign", "k", "--data", "x", "--format", "pem"}).code == 2);
  CHECK(hsmctl(agent, {"verify", "k", "--data", "x"}).code == 2);  // no signature
  CHECK(hsmctl(agent, {"verify", "k", "--data", "x", "--sig-b64url", "!!"}).code == 2);
  CHECK(hsmctl(agent, {"--timeout", "0", "health"}).code == 2);
  CHECK(agent.requests().size() == 2);  // no usage error reached the agent

  run = hsmctl(agent, {"--help"});
  CHECK(run.code == 0);
  CHECK(contains(run.out, "Exit codes"));
}

TEST_CASE("hsmctl --json output stays valid JSON whatever the bytes", "[hsmctl][json]") {
  FakeAgent agent;
  // A kid that is not UTF-8 (refused before it is sent) and one with quotes and control bytes.
  for (const std::string& kid : {std::string("k\xff\xc0\xaf"), std::string("a\"b\\c\n\x01")}) {
    const auto run = hsmctl(agent, {"--json", "delete", kid});
    const std::string& text = run.out.empty() ? run.err : run.out;
    INFO(text);
    const auto parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    REQUIRE_FALSE(parsed.is_discarded());
    CHECK(parsed.is_object());
  }
  const auto run = hsmctl(agent, {"--json", "delete", "a\"b\\c\n\x01"});
  CHECK(run.out == "{\"kid\":\"a\\\"b\\\\c\\n\\u0001\",\"deleted\":false}\n");
}

TEST_CASE("base64url and hex and PEM encodings", "[hsmctl][encoding]") {
  using hsm::hsmctl::Bytes;
  using hsm::hsmctl::decode_base64url;
  using hsm::hsmctl::encode_base64url;
  // RFC 4648 test vectors, in the url alphabet without padding.
  const std::vector<std::pair<std::string, std::string>> vectors{
      {"", ""},           {"f", "Zg"},          {"fo", "Zm8"},         {"foo", "Zm9v"},
      {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, encoded] : vectors) {
    CHECK(encode_base64url(Bytes(plain.begin(), plain.end())) == encoded);
    if (!encoded.empty()) {
      CHECK(decode_base64url(encoded) == Bytes(plain.begin(), plain.end()));
    }
  }
  const Bytes url_specific{0xfb, 0xff, 0xbf};
  CHECK(encode_base64url(url_specific) == "-_-_");
  CHECK(decode_base64url("-_-_") == url_specific);
  CHECK(decode_base64url("Zm8=\n") == Bytes{'f', 'o'});  // padding and whitespace tolerated
  CHECK_THROWS_AS(decode_base64url("Zm9v+"), hsm::hsmctl::UsageError);  // '+' is not base64url
  CHECK_THROWS_AS(decode_base64url("Z"), hsm::hsmctl::UsageError);
  CHECK_THROWS_AS(decode_base64url(""), hsm::hsmctl::UsageError);

  CHECK(hsm::hsmctl::decode_hex("00ABff") == Bytes{0x00, 0xab, 0xff});
  CHECK_THROWS_AS(hsm::hsmctl::decode_hex("abc"), hsm::hsmctl::UsageError);
  CHECK_THROWS_AS(hsm::hsmctl::decode_hex("zz"), hsm::hsmctl::UsageError);

  CHECK(hsm::hsmctl::spki_to_pem(Bytes{0x30, 0x03, 0x02, 0x01, 0x00}) ==
        "-----BEGIN PUBLIC KEY-----\nMAMCAQA=\n-----END PUBLIC KEY-----\n");
}

TEST_CASE("input files larger than the limit are refused", "[hsmctl][encoding]") {
  TempFile big;
  big.write(std::string(100, 'x'));
  CHECK(hsm::hsmctl::read_file(big.path, 100).size() == 100);
  CHECK_THROWS_AS(hsm::hsmctl::read_file(big.path, 99), hsm::hsmctl::UsageError);
}
