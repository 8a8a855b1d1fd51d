// hsm-issue-jwt: issues a JWT signed by a key that never leaves the HSM, then verifies it
// offline against the agent's JWKS, the way a relying party would.
//
//   HSM_AGENT_SOCKET=/run/hsm-agent/agent.sock hsm-issue-jwt [KID [ALG]]
//
// KID defaults to "example-jwt"; the key is generated in the token (ALG, default ES256) when the
// agent has no key of that name (Client::ensure_key). Prints the JWT on stdout and what was
// verified on stderr. Exit status: 0 issued and verified, 1 any error (printed on stderr).
#include <chrono>
#include <cstdio>
#include <exception>
#include <hsm/client.hpp>
#include <hsm/jose.hpp>
#include <nlohmann/json.hpp>
#include <string>

int main(int argc, char** argv) {
  const std::string kid = argc > 1 ? argv[1] : "example-jwt";
  const std::string alg = argc > 2 ? argv[2] : "ES256";
  try {
    hsm::ClientOptions options;  // socket from $HSM_AGENT_SOCKET, 5 s per call, retries on
    hsm::Client client{options};
    // Created in the token only when missing; safe when several replicas start at once.
    const hsm::PublicKey key = client.ensure_key(kid, alg);

    const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    const nlohmann::json claims{
        {"iss", "hsm-issue-jwt"}, {"sub", "example-user"}, {"iat", now}, {"exp", now + 300}};
    // Signed inside the HSM; this call may take at most 2 s of the default 5.
    const std::string jwt =
        client.sign_jwt(kid, claims, "{}", {.timeout = std::chrono::milliseconds(2000)});

    // A relying party fetches the JWKS once and verifies every token offline.
    const hsm::jose::Verified verified = hsm::jose::verify(jwt, client.get_jwks());
    std::printf("%s\n", jwt.c_str());
    std::fprintf(stderr, "verified: alg=%s kid=%s (key alg %s) claims=%s\n", verified.alg.c_str(),
                 verified.kid.value_or("").c_str(), key.alg.c_str(),
                 verified.payload_text().c_str());
    return 0;
  } catch (const hsm::Error& e) {
    // errc() for decisions, what() (code and message) for the log.
    std::fprintf(stderr, "hsm-issue-jwt: %s%s\n", e.what(),
                 e.errc() == hsm::Errc::kConnectionFailed ? " (is the agent running?)" : "");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hsm-issue-jwt: %s\n", e.what());
    return 1;
  }
}
