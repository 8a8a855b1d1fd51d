// hsm::Client against the real hsm-agent on a private SoftHSMv2 token: JOSE output checked by
// OpenSSL directly (tests/fixtures/openssl_check) and by the library's own verifier, negative
// verification cases, 16 threads sharing one Client, and the agent SIGKILLed and restarted on
// the same socket in the middle of a stream of signs, ensure_key raced by concurrent creators,
// JWT claims as nlohmann::json.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <future>
#include <hsm/client.hpp>
#include <hsm/jose.hpp>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fixtures/agent_process.hpp"
#include "fixtures/fault_module.hpp"
#include "fixtures/openssl_check.hpp"
#include "fixtures/polling.hpp"
#include "fixtures/softhsm_token.hpp"

using namespace std::chrono_literals;
using hsm::jose::Reason;
using hsm::test::AgentOptions;
using hsm::test::AgentProcess;
using hsm::test::FaultModule;
using hsm::test::SoftHsmToken;
using hsm::test::wait_until;

namespace {

constexpr const char* kAllAlgs[] = {"ES256", "ES384", "ES512", "ES256K", "RS256", "RS384",
                                    "RS512", "PS256", "PS384", "PS512",  "EdDSA"};

struct Parts {
  std::string header_json;
  std::string signing_input;
  hsm::Bytes payload;
  hsm::Bytes signature;
};

Parts split(const std::string& compact) {
  const auto first = compact.find('.');
  const auto second = compact.find('.', first + 1);
  REQUIRE(first != std::string::npos);
  REQUIRE(second != std::string::npos);
  REQUIRE(compact.find('.', second + 1) == std::string::npos);
  const auto header = hsm::test::base64url_decode(compact.substr(0, first));
  return Parts{std::string(header.begin(), header.end()), compact.substr(0, second),
               hsm::test::base64url_decode(compact.substr(first + 1, second - first - 1)),
               hsm::test::base64url_decode(compact.substr(second + 1))};
}

std::string b64(std::string_view text) {
  return hsm::test::base64url_encode(hsm::test::to_bytes(text));
}

/// The reason of the jose::Error that `verify` throws, or nullopt when it does not throw.
template <class F>
std::optional<Reason> refusal(F&& verify) {
  try {
    (void)verify();
  } catch (const hsm::jose::Error& e) {
    return e.reason();
  }
  return std::nullopt;
}

/// The sum of hsm_agent_requests_total over every code for method="generate_key".
std::uint64_t generate_requests(const std::string& metrics) {
  std::istringstream lines(metrics);
  std::uint64_t total = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("hsm_agent_requests_total{", 0) == 0 &&
        line.find(R"(method="generate_key")") != std::string::npos) {
      total += static_cast<std::uint64_t>(std::stod(line.substr(line.rfind(' ') + 1)));
    }
  }
  return total;
}

/// One running agent with a client on it.
struct Env {
  SoftHsmToken token;
  AgentProcess agent{token};
  hsm::Client client{agent.socket_path()};
};

}  // namespace

TEST_CASE("base64url is canonical and refuses padding and foreign characters", "[jose]") {
  const hsm::Bytes bytes{0xfb, 0xff, 0x00, 0x10};
  CHECK(hsm::jose::base64url_encode(bytes) == "-_8AEA");
  CHECK(hsm::jose::base64url_decode("-_8AEA") == bytes);
  CHECK(hsm::jose::base64url_decode("").empty());
  for (const char* bad : {"-_8AEA==", "-_8+EA", "-_8/EA", "a", "-_8AEB", "ab c"}) {
    INFO(bad);
    CHECK(refusal([&] { return hsm::jose::base64url_decode(bad); }) == Reason::kMalformed);
  }
}

TEST_CASE("sign_jws and sign_jwt for every alg, verified by OpenSSL and by hsm::jose",
          "[jose][agent]") {
  Env env;
  const auto caps = env.client.capabilities();
  for (const char* alg : kAllAlgs) {
    INFO(alg);
    REQUIRE(std::find(caps.supported_algs.begin(), caps.supported_algs.end(), alg) !=
            caps.supported_algs.end());
    const std::string kid = std::string("jose-") + alg;
    env.client.generate_key(kid, alg);
    const auto pub = env.client.get_public_key(kid);

    const std::string alg_header = std::string(R"({"alg":")") + alg + "\"}";
    const std::string jwt = env.client.sign_jwt(kid, R"({ "sub": "alice", "n": 1 })", alg_header);
    const Parts parts = split(jwt);
    const auto header = nlohmann::json::parse(parts.header_json);
    CHECK(header.at("alg") == alg);
    CHECK(header.at("kid") == kid);
    CHECK(header.at("typ") == "JWT");
    CHECK(std::string(parts.payload.begin(), parts.payload.end()) == R"({"sub":"alice","n":1})");
    // OpenSSL on its own (the fixture), from the JWK and from the SPKI the agent returned.
    const auto input = hsm::test::to_bytes(parts.signing_input);
    CHECK(hsm::test::verify_with_jwk(pub.jwk, alg, input, parts.signature));
    CHECK(hsm::test::verify_with_spki(pub.spki, alg, input, parts.signature));
    // The library's verifier, against the JWK, the JWKS and their JSON forms.
    // The agent's JWK names the alg the key was generated for (recorded on the token), so the
    // verifier's strict check of the JWK's alg passes as is.
    const hsm::Jwk& jwk = pub.jwk;
    const std::vector<hsm::Jwk> jwks = env.client.get_jwks();
    CHECK(jwk.at("alg") == alg);
    const auto verified = hsm::jose::verify(jwt, jwk);
    CHECK(verified.alg == alg);
    CHECK(verified.kid == kid);
    CHECK(verified.payload_text() == R"({"sub":"alice","n":1})");
    CHECK(hsm::jose::verify(jwt, jwks).kid == kid);
    nlohmann::json jwks_json = {{"keys", nlohmann::json::array()}};
    for (const auto& entry : jwks) {
      jwks_json["keys"].push_back(nlohmann::json(entry));
    }
    CHECK(hsm::jose::verify_json(jwt, jwks_json.dump()).alg == alg);
    CHECK(hsm::jose::verify_json(jwt, nlohmann::json(jwk).dump()).alg == alg);

    // A JWS with the caller's header fields and a binary payload.
    const hsm::Bytes payload{0x00, 0xff, 0x10, 0x80};
    const std::string jws = env.client.sign_jws(
        kid, std::string(R"({"cty":"bin","x-n":[1,2],"alg":")") + alg + "\"}", payload);
    const Parts jws_parts = split(jws);
    const auto jws_header = nlohmann::json::parse(jws_parts.header_json);
    CHECK(jws_header.at("alg") == alg);
    CHECK(jws_header.at("cty") == "bin");
    CHECK(jws_header.at("x-n") == nlohmann::json::array({1, 2}));
    CHECK(jws_parts.payload == payload);
    CHECK(hsm::test::verify_with_jwk(pub.jwk, alg, hsm::test::to_bytes(jws_parts.signing_input),
                                     jws_parts.signature));
    CHECK(hsm::jose::verify(jws, jwk).payload == payload);
    CHECK(jws_parts.header_json.rfind(std::string(R"({"alg":")") + alg + R"(","kid":")", 0) == 0);
    // Without an alg in the header, the key's own alg is used.
    const Parts default_parts = split(env.client.sign_jwt(kid, "{}"));
    CHECK(nlohmann::json::parse(default_parts.header_json).at("alg") == pub.jwk.at("alg"));
  }
}

TEST_CASE("verification refuses tampering, wrong keys, kid and alg mismatches, bad input",
          "[jose][agent]") {
  Env env;
  env.client.generate_key("es", "ES256");
  env.client.generate_key("es-other", "ES256");
  env.client.generate_key("rsa", "RS256");
  env.client.generate_key("ed", "EdDSA");
  const hsm::Jwk es = env.client.get_public_key("es").jwk;
  const hsm::Jwk rsa = env.client.get_public_key("rsa").jwk;
  const hsm::Jwk ed = env.client.get_public_key("ed").jwk;
  const std::string jwt = env.client.sign_jwt("es", R"({"sub":"alice"})");
  REQUIRE_NOTHROW(hsm::jose::verify(jwt, es));
  const Parts parts = split(jwt);
  const std::string header_b64 = jwt.substr(0, jwt.find('.'));
  const std::string sig_b64 = jwt.substr(jwt.rfind('.') + 1);
  auto verify_es = [&](const std::string& token) {
    return refusal([&] { return hsm::jose::verify(token, es); });
  };

  SECTION("tampered payload") {
    CHECK(verify_es(header_b64 + "." + b64(R"({"sub":"mallory"})") + "." + sig_b64) ==
          Reason::kBadSignature);
  }
  SECTION("tampered signature") {
    for (std::size_t at : {std::size_t{0}, std::size_t{31}, std::size_t{63}}) {
      auto sig = parts.signature;
      sig[at] ^= 0x01;
      CHECK(verify_es(parts.signing_input + "." + hsm::test::base64url_encode(sig)) ==
            Reason::kBadSignature);
    }
    // A signature of the wrong length (DER instead of r||s, truncated) is a bad signature.
    auto shorter = parts.signature;
    shorter.pop_back();
    CHECK(verify_es(parts.signing_input + "." + hsm::test::base64url_encode(shorter)) ==
          Reason::kBadSignature);
    CHECK(verify_es(parts.signing_input + ".") == Reason::kBadSignature);
  }
  SECTION("wrong key") {
    hsm::Jwk other = env.client.get_public_key("es-other").jwk;
    other.erase("kid");  // same alg and curve, no kid to tell them apart: the signature decides
    CHECK(refusal([&] { return hsm::jose::verify(jwt, other); }) == Reason::kBadSignature);
    // The JWKS picks the key by kid; it is the other key that carries "es"'s kid here.
    hsm::Jwk impostor = env.client.get_public_key("es-other").jwk;
    impostor["kid"] = "es";
    CHECK(refusal([&] { return hsm::jose::verify(jwt, std::vector<hsm::Jwk>{impostor}); }) ==
          Reason::kBadSignature);
  }
  SECTION("kid mismatch") {
    CHECK(refusal([&] {
            return hsm::jose::verify(jwt, env.client.get_public_key("es-other").jwk);
          }) == Reason::kKidMismatch);
    CHECK(refusal([&] {
            return hsm::jose::verify(jwt, std::vector<hsm::Jwk>{rsa, ed});
          }) == Reason::kKidMismatch);
    // sign_jws refuses a header kid that is not the key's.
    CHECK(refusal([&] { return env.client.sign_jws("es", R"({"kid":"other"})", "x"); }) ==
          Reason::kKidMismatch);
  }
  SECTION("alg none and unknown algs") {
    CHECK(verify_es(b64(R"({"alg":"none","kid":"es"})") + "." + b64("{}") + ".") ==
          Reason::kUnsupportedAlg);
    CHECK(verify_es(b64(R"({"alg":"HS256","kid":"es"})") + "." + b64("{}") + "." + sig_b64) ==
          Reason::kUnsupportedAlg);
    CHECK(verify_es(b64(R"({"kid":"es"})") + "." + b64("{}") + "." + sig_b64) ==
          Reason::kUnsupportedAlg);
    CHECK(verify_es(b64(R"({"alg":7})") + "." + b64("{}") + "." + sig_b64) ==
          Reason::kUnsupportedAlg);
  }
  SECTION("alg that does not fit the key") {
    // The header says ES384 but the key is P-256 (the JWK's own alg removed, so kty/crv decide).
    hsm::Jwk no_alg = es;
    no_alg.erase("alg");
    const std::string es384 =
        b64(R"({"alg":"ES384","kid":"es"})") + "." + jwt.substr(header_b64.size() + 1);
    CHECK(refusal([&] { return hsm::jose::verify(es384, no_alg); }) == Reason::kAlgMismatch);
    CHECK(refusal([&] { return hsm::jose::verify(es384, es); }) == Reason::kAlgMismatch);
    // An RSA alg against an EC key, EdDSA against RSA, ES256 against the Ed25519 key.
    hsm::Jwk rsa_no_alg = rsa;
    rsa_no_alg.erase("alg");
    rsa_no_alg.erase("kid");
    hsm::Jwk ed_no_alg = ed;
    ed_no_alg.erase("alg");
    ed_no_alg.erase("kid");
    no_alg.erase("kid");
    const std::string rs256 = b64(R"({"alg":"RS256"})") + "." + b64("{}") + "." + sig_b64;
    const std::string eddsa = b64(R"({"alg":"EdDSA"})") + "." + b64("{}") + "." + sig_b64;
    const std::string es256 = b64(R"({"alg":"ES256"})") + "." + b64("{}") + "." + sig_b64;
    CHECK(refusal([&] { return hsm::jose::verify(rs256, no_alg); }) == Reason::kAlgMismatch);
    CHECK(refusal([&] { return hsm::jose::verify(eddsa, rsa_no_alg); }) == Reason::kAlgMismatch);
    CHECK(refusal([&] { return hsm::jose::verify(es256, ed_no_alg); }) == Reason::kAlgMismatch);
    // The caller's expectation, and sign_jws refusing a header alg that is not the key's.
    hsm::jose::VerifyOptions expect_rs;
    expect_rs.expected_alg = "RS256";
    CHECK(refusal([&] { return hsm::jose::verify(jwt, es, expect_rs); }) == Reason::kAlgMismatch);
    // sign_jws: an alg the key cannot do is refused by the agent; an unknown one before that.
    std::optional<std::string> code;
    try {
      (void)env.client.sign_jws("es", R"({"alg":"ES384"})", "x");
    } catch (const hsm::Error& e) {
      code = e.code();
    }
    CHECK(code == std::optional<std::string>("unsupported_alg"));
    CHECK(refusal([&] { return env.client.sign_jws("es", R"({"alg":"none"})", "x"); }) ==
          Reason::kUnsupportedAlg);
  }
  SECTION("malformed input") {
    for (const std::string& bad :
         {std::string(""), std::string("."), std::string(".."), header_b64,
          header_b64 + "." + sig_b64, jwt + ".", jwt + "." + sig_b64,
          "." + jwt.substr(jwt.find('.')), b64("not json") + "." + b64("{}") + "." + sig_b64,
          b64(R"(["alg","ES256"])") + "." + b64("{}") + "." + sig_b64,
          header_b64 + "=." + jwt.substr(header_b64.size() + 1),
          header_b64 + ".pay load." + sig_b64,
          b64(R"({"alg":"ES256","kid":"es","crit":["exp"]})") + "." + b64("{}") + "." + sig_b64,
          b64(R"({"alg":"ES256","kid":5})") + "." + b64("{}") + "." + sig_b64}) {
      INFO(bad);
      CHECK(verify_es(bad) == Reason::kMalformed);
    }
    CHECK(refusal([&] { return hsm::jose::verify_json(jwt, "{not json"); }) == Reason::kMalformed);
    CHECK(refusal([&] { return hsm::jose::verify_json(jwt, R"({"keys":{}})"); }) ==
          Reason::kMalformed);
    CHECK(refusal([&] { return env.client.sign_jwt("es", "[1,2]"); }) == Reason::kMalformed);
    CHECK(refusal([&] { return env.client.sign_jws("es", "{", "x"); }) == Reason::kMalformed);
    hsm::Jwk broken = es;
    broken["x"] = broken["y"];  // not a point on the curve
    CHECK(refusal([&] { return hsm::jose::verify(jwt, broken); }) == Reason::kBadKey);
  }
  SECTION("oversized input is refused before it is decoded") {
    const std::string huge =
        header_b64 + "." + std::string(hsm::jose::kDefaultMaxJwsBytes, 'A') + "." + sig_b64;
    CHECK(verify_es(huge) == Reason::kTooLarge);
    hsm::jose::VerifyOptions small;
    small.max_bytes = 16;
    CHECK(refusal([&] { return hsm::jose::verify(jwt, es, small); }) == Reason::kTooLarge);
  }
}

TEST_CASE("16 threads share one Client with sync and async calls, every signature verified",
          "[threads][agent]") {
  Env env;
  hsm::ClientOptions options;
  options.socket_path = env.agent.socket_path();
  options.connections = 2;
  options.timeout = 60s;  // a loaded CI machine: the deadline is not what this test is about
  hsm::Client client{options};
  client.generate_key("t-es", "ES256");
  client.generate_key("t-ed", "EdDSA");
  const auto es = client.get_public_key("t-es").jwk;
  const auto ed = client.get_public_key("t-ed").jwk;

  struct Signed {
    std::string kid;
    std::string data;
    hsm::Bytes signature;
  };
  constexpr std::size_t kThreads = 16;
  constexpr std::size_t kRounds = 12;
  std::vector<std::vector<Signed>> signed_by(kThreads);
  std::vector<std::vector<std::string>> jwts_by(kThreads);
  std::atomic<std::size_t> verify_true{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t i = 0; i < kRounds; ++i) {
        const std::string kid = (t + i) % 2 == 0 ? "t-es" : "t-ed";
        const std::string data = "thread " + std::to_string(t) + " round " + std::to_string(i);
        const auto bytes = hsm::test::to_bytes(data);
        switch (i % 4) {
          case 0:  // synchronous
            signed_by[t].push_back({kid, data, client.sign(kid, data)});
            break;
          case 1:  // future
            signed_by[t].push_back({kid, data, client.sign_async(kid, bytes).get().signature});
            break;
          case 2: {  // callback: runs on a client thread, hands the outcome back
            std::promise<hsm::Outcome<hsm::Signature>> done;
            auto outcome = done.get_future();
            client.sign_async(kid, bytes, [&done](hsm::Outcome<hsm::Signature> o) {
              done.set_value(std::move(o));
            });
            signed_by[t].push_back({kid, data, outcome.get().value().signature});
            break;
          }
          default: {  // a JWT, and the agent's own verify of an earlier signature
            jwts_by[t].push_back(client.sign_jwt(kid, R"({"t":)" + std::to_string(t) + "}"));
            const Signed& earlier = signed_by[t].front();
            if (client
                    .verify_async(earlier.kid, hsm::test::to_bytes(earlier.data), earlier.signature)
                    .get()) {
              ++verify_true;
            }
          }
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  std::size_t checked = 0;
  for (std::size_t t = 0; t < kThreads; ++t) {
    for (const Signed& s : signed_by[t]) {
      const auto& jwk = s.kid == "t-es" ? es : ed;
      CHECK(
          hsm::test::verify_with_jwk(jwk, jwk.at("alg"), hsm::test::to_bytes(s.data), s.signature));
      ++checked;
    }
    for (const std::string& jwt : jwts_by[t]) {
      const Parts parts = split(jwt);
      const auto verified = hsm::jose::verify(jwt, std::vector<hsm::Jwk>{es, ed});
      CHECK(hsm::test::verify_with_jwk(verified.kid == "t-es" ? es : ed, verified.alg,
                                       hsm::test::to_bytes(parts.signing_input), parts.signature));
      ++checked;
    }
  }
  CHECK(checked == kThreads * kRounds);
  CHECK(verify_true.load() == kThreads * kRounds / 4);
}

TEST_CASE("the agent SIGKILLed and restarted mid-stream: the client recovers by itself",
          "[restart][agent]") {
  SoftHsmToken token;
  const hsm::test::TempDir scratch("hsm-client-restart");
  const auto& dir = scratch.path();
  AgentOptions agent_options;
  agent_options.socket = dir / "agent.sock";
  std::optional<AgentProcess> agent;
  agent.emplace(token, agent_options);

  hsm::ClientOptions options;
  options.socket_path = (dir / "agent.sock").string();
  options.timeout = 20s;  // long enough for a restart on a loaded machine
  options.retry.max_attempts = 10000;
  options.retry.max_backoff = 200ms;
  hsm::Client client{options};
  client.generate_key("stream", "ES256");
  const auto jwk = client.get_public_key("stream").jwk;

  std::atomic<bool> stop{false};
  std::atomic<int> generation{0};  // 0 before the kill, 1 after the restart
  std::atomic<int> ok_before{0};
  std::atomic<int> ok_after{0};
  std::atomic<int> bad_signatures{0};
  std::atomic<int> overdue{0};
  std::mutex failures_mutex;
  std::vector<std::string> failures;
  // A call may end with an error (a timeout if the restart took longer than the deadline) but
  // never later than its deadline; the grace covers scheduling on a loaded machine.
  const auto grace = 10s;
  std::vector<std::thread> signers;
  for (int t = 0; t < 4; ++t) {
    signers.emplace_back([&, t] {
      for (int i = 0; !stop.load(); ++i) {
        const std::string data = "stream " + std::to_string(t) + "/" + std::to_string(i);
        const int gen = generation.load();
        const auto started = std::chrono::steady_clock::now();
        try {
          const auto signature =
              (i % 2 == 0) ? client.sign("stream", data)
                           : client.sign_async("stream", hsm::test::to_bytes(data)).get().signature;
          if (!hsm::test::verify_with_jwk(jwk, "ES256", hsm::test::to_bytes(data), signature)) {
            ++bad_signatures;
          }
          ++(gen == 0 ? ok_before : ok_after);
        } catch (const hsm::Error& e) {
          std::lock_guard lock(failures_mutex);
          failures.emplace_back(e.code());
        }
        if (std::chrono::steady_clock::now() - started > options.timeout + grace) {
          ++overdue;
        }
      }
    });
  }
  REQUIRE(wait_until([&] { return ok_before.load() >= 40; }, 60s));
  agent->signal(SIGKILL);
  REQUIRE(agent->wait_exit(20s).has_value());
  generation.store(1);
  agent.reset();
  agent.emplace(token, agent_options);  // same token, same socket path
  const bool recovered = wait_until([&] { return ok_after.load() >= 40; }, 90s);
  stop.store(true);
  for (auto& thread : signers) {
    thread.join();
  }
  CHECK(recovered);
  CHECK(bad_signatures.load() == 0);
  CHECK(overdue.load() == 0);
  // Signs are idempotent and retried through the restart; the only acceptable failures are
  // those of a restart slower than a deadline.
  for (const auto& code : failures) {
    CHECK((code == hsm::kTimeout || code == hsm::kConnectionFailed || code == "hsm_unavailable" ||
           code == "shutting_down"));
  }
  INFO("failures: " << failures.size());
  CHECK(client.health().ok);
}

TEST_CASE("generate_key in flight when the agent dies is not repeated on the new agent",
          "[restart][agent]") {
  SoftHsmToken token;
  const FaultModule faults(FaultModule::RuleChecks::kEveryCall);
  const auto& dir = faults.directory();
  AgentOptions agent_options = faults.agent_options();
  agent_options.socket = dir / "agent.sock";
  std::optional<AgentProcess> agent;
  agent.emplace(token, agent_options);
  // Armed once the agent is up (its start-up probe may generate keys itself); the module reads
  // its rules before every call.
  faults.set("C_GenerateKeyPair hang=1");

  hsm::ClientOptions options;
  options.socket_path = (dir / "agent.sock").string();
  options.timeout = 30s;
  options.retry.max_attempts = 10000;
  options.retry.max_backoff = 100ms;
  hsm::Client client{options};
  const auto started = std::chrono::steady_clock::now();
  auto pending = client.generate_key_async("once", "ES256");
  // The request reached the token: C_GenerateKeyPair is hanging inside the first agent.
  REQUIRE(wait_until([&] { return faults.count("C_GenerateKeyPair.injected") == 1; }, 30s));
  agent->signal(SIGKILL);
  REQUIRE(agent->wait_exit(20s).has_value());
  agent.reset();

  // The second agent: same token and socket, no faults, its own stats file. It is up before
  // the client could have given up, so a blind retry would reach it.
  faults.clear();
  agent_options.env["HSM_FAULT_STATS"] = (dir / "stats-second.txt").string();
  agent.emplace(token, agent_options);
  // The same client, without being told, reconnects to the new agent.
  client.generate_key("probe-key", "ES256");  // counted below: 1 C_GenerateKeyPair

  REQUIRE(pending.wait_until(started + options.timeout + 10s) == std::future_status::ready);
  std::optional<std::string> code;
  try {
    (void)pending.get();
  } catch (const hsm::Error& e) {
    code = e.code();
  }
  REQUIRE(code.has_value());
  CHECK(*code == hsm::kConnectionFailed);
  // Not repeated: the second agent answered exactly one generate_key request (the probe key;
  // its start-up mechanism probe generates keys too, so the module's C_GenerateKeyPair count is
  // not the measure here), and there is no key "once".
  const auto [status, metrics] = agent->http_get("/metrics");
  REQUIRE(status == 200);
  CHECK(generate_requests(metrics) == 1);
  const auto keys = client.list_keys();
  CHECK(std::none_of(keys.begin(), keys.end(), [](const auto& k) { return k.kid == "once"; }));
  CHECK(std::any_of(keys.begin(), keys.end(), [](const auto& k) { return k.kid == "probe-key"; }));
  // delete_key is not repeated either: the same flow for the other non-idempotent method is
  // covered by the retry rule unit tests (client_test.cpp); here the agent stays up.
  agent.reset();
}

TEST_CASE("ensure_key: concurrent creators all get the one key that was made",
          "[agent][ensure_key]") {
  Env env;
  constexpr int kCreators = 6;
  // Each creator is its own Client (own connection), as separate replicas starting together.
  std::vector<std::unique_ptr<hsm::Client>> clients;
  for (int i = 0; i < kCreators; ++i) {
    clients.push_back(std::make_unique<hsm::Client>(env.agent.socket_path()));
    (void)clients.back()->health();  // connected before the race starts
  }
  for (const char* kid : {"race-1", "race-2", "race-3"}) {
    INFO(kid);
    std::atomic<int> ready{0};
    std::vector<std::future<hsm::PublicKey>> created;
    for (int i = 0; i < kCreators; ++i) {
      created.push_back(std::async(std::launch::async, [&, i] {
        ready.fetch_add(1);
        while (ready.load() < kCreators) {
          std::this_thread::yield();  // start together: the race is the point
        }
        return clients[static_cast<std::size_t>(i)]->ensure_key(kid, "ES256");
      }));
    }
    std::vector<hsm::PublicKey> keys;
    for (auto& future : created) {
      keys.push_back(future.get());  // none throws already_exists
    }
    for (const auto& key : keys) {
      CHECK(key.kid == kid);
      CHECK(key.alg == "ES256");
      CHECK(key.spki == keys.front().spki);
    }
    const auto listed = env.client.list_keys();
    CHECK(std::count_if(listed.begin(), listed.end(),
                        [&](const hsm::KeyInfo& key) { return key.kid == kid; }) == 1);
    // The key they got is the one that signs.
    const hsm::Bytes sig = env.client.sign(kid, std::string_view("payload"));
    CHECK(env.client.verify(kid, std::string_view("payload"), sig));
    CHECK(hsm::test::verify_with_spki(keys.front().spki, "ES256", hsm::test::to_bytes("payload"),
                                      sig));
  }
  // Present with another alg: refused, not replaced.
  const hsm::Error mismatch = [&] {
    try {
      (void)env.client.ensure_key("race-1", "ES384");
    } catch (const hsm::Error& e) {
      return e;
    }
    FAIL("expected already_exists");
    throw std::logic_error("unreachable");
  }();
  CHECK(mismatch.errc() == hsm::Errc::kAlreadyExists);
  CHECK(env.client.get_public_key("race-1").alg == "ES256");
}

TEST_CASE("sign_jwt takes the claims as nlohmann::json; agent errors have typed codes",
          "[jose][agent]") {
  Env env;
  env.client.generate_key("json-claims", "ES256");
  const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  const nlohmann::json claims{
      {"sub", "alice"}, {"iat", now}, {"exp", now + 300}, {"roles", {"reader", "writer"}}};
  const std::string jwt = env.client.sign_jwt("json-claims", claims);
  const auto verified = hsm::jose::verify(jwt, env.client.get_jwks());
  CHECK(nlohmann::json::parse(verified.payload_text()) == claims);
  CHECK(nlohmann::json::parse(split(jwt).header_json).at("typ") == "JWT");
  // Anything but an object is refused before signing.
  CHECK(refusal([&] { return env.client.sign_jwt("json-claims", nlohmann::json::array()); }) ==
        Reason::kMalformed);

  try {
    (void)env.client.get_public_key("no-such-key");
    FAIL("expected not_found");
  } catch (const hsm::Error& e) {
    CHECK(e.errc() == hsm::Errc::kNotFound);
    CHECK(e.code() == "not_found");
  }
}
