// hsm-issue-jwt: issues a JWT signed by a key that never leaves the HSM, then verifies it
// offline against the agent's JWKS, the way a relying party would.
//
//   HSM_AGENT_SOCKET=/run/hsm-agent/agent.sock hsm-issue-jwt [KID [ALG]]
//
// KID defaults to "example-jwt"; the key is generated in the token (ALG, default ES256) when the
// agent has no key of that name. Prints the JWT on stdout and what was verified on stderr.
// Exit status: 0 issued and verified, 1 any error (printed on stderr).
#include <chrono>
#include <cstdio>
#include <exception>
#include <hsm/client.hpp>
#include <hsm/jose.hpp>
#include <string>

namespace {

/// The key's alg; generates the key first when the agent does not have it.
std::string ensure_key(hsm::Client& client, const std::string& kid, const std::string& alg) {
  try {
    return client.get_public_key(kid).alg;
  } catch (const hsm::Error& e) {
    if (e.code() != "not_found") {
      throw;
    }
  }
  return client.generate_key(kid, alg).alg;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string kid = argc > 1 ? argv[1] : "example-jwt";
  const std::string alg = argc > 2 ? argv[2] : "ES256";
  try {
    hsm::ClientOptions options;  // socket from $HSM_AGENT_SOCKET, 5 s per call, retries on
    hsm::Client client{options};
    const std::string key_alg = ensure_key(client, kid, alg);

    const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    const std::string claims = R"({"iss":"hsm-issue-jwt","sub":"example-user","iat":)" +
                               std::to_string(now) + R"(,"exp":)" + std::to_string(now + 300) + "}";
    const std::string jwt = client.sign_jwt(kid, claims);  // signed inside the HSM

    // A relying party fetches the JWKS once and verifies every token offline.
    const hsm::jose::Verified verified = hsm::jose::verify(jwt, client.get_jwks());
    std::printf("%s\n", jwt.c_str());
    std::fprintf(stderr, "verified: alg=%s kid=%s (key alg %s) claims=%s\n", verified.alg.c_str(),
                 verified.kid.value_or("").c_str(), key_alg.c_str(),
                 verified.payload_text().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hsm-issue-jwt: %s\n", e.what());
    return 1;
  }
}
