#!/usr/bin/env node
// Issues a JWT signed inside the HSM through hsm-agent, then checks it as a relying party would:
// with jose's jwtVerify, against the agent's JWKS.
//
//   HSM_AGENT_SOCKET=/path/to/agent.sock node examples/issue-jwt.mjs [kid] [subject]
//
// The key is generated on first use (ES256); later runs sign with the same key.
import { HsmClient, HsmError, agentJwks } from "@hsm-sidecar/client";
import { jwtVerify } from "jose";

const kid = process.argv[2] ?? "example-issuer";
const subject = process.argv[3] ?? "alice";
const client = new HsmClient(); // socket: $HSM_AGENT_SOCKET, else /run/hsm-agent/agent.sock

try {
  try {
    await client.generateKey(kid, { alg: "ES256" });
  } catch (err) {
    if (!(err instanceof HsmError && err.code === "already_exists")) throw err;
  }
  const now = Math.floor(Date.now() / 1000);
  const jwt = await client.signJwt(kid, {
    iss: "https://issuer.example",
    sub: subject,
    iat: now,
    exp: now + 600,
  });
  const { payload, protectedHeader } = await jwtVerify(jwt, agentJwks(client), {
    issuer: "https://issuer.example",
  });
  console.log(jwt);
  console.log(JSON.stringify({ header: protectedHeader, claims: payload }));
} catch (err) {
  console.error(err instanceof HsmError ? `${err.code}: ${err.message}` : err);
  process.exitCode = 1;
} finally {
  client.close();
}
