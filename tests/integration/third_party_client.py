#!/usr/bin/python3
"""A MessagePack-RPC client written only from protocol/README.md, with no code of this
project: generates a key, signs a JWS signing input, and verifies the compact JWS with a
standard JOSE library (jwcrypto) against the JWK the agent returned.

usage: third_party_client.py SOCKET_PATH
"""
import base64
import json
import socket
import sys

import msgpack
from jwcrypto import jwk, jws


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Agent:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    def call(self, method, params):
        self.msgid += 1
        self.sock.sendall(msgpack.packb([0, self.msgid, method, [params]], use_bin_type=True))
        while True:
            for message in self.unpacker:
                kind, msgid, error, result = message
                assert kind == 1 and msgid == self.msgid, message
                if error is not None:
                    raise RuntimeError(f"{method}: {error['code']}: {error['message']}")
                return result
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("agent closed the connection")
            self.unpacker.feed(chunk)


def main():
    agent = Agent(sys.argv[1])
    caps = agent.call("capabilities", {})
    assert caps["protocol"] == 1, caps
    key = agent.call("generate_key", {"kid": "third-party", "alg": "ES256"})
    header = {"alg": key["alg"], "kid": key["kid"], "typ": "JWT"}
    payload = {"sub": "interop", "iat": 1700000000}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64url(json.dumps(payload, separators=(",", ":")).encode()))
    signed = agent.call("sign", {"kid": "third-party", "data": signing_input.encode()})
    assert isinstance(signed["signature"], bytes) and len(signed["signature"]) == 64
    token = signing_input + "." + b64url(signed["signature"])

    public = agent.call("get_public_key", {"kid": "third-party"})
    verifier = jws.JWS()
    verifier.deserialize(token)
    verifier.verify(jwk.JWK(**public["jwk"]), alg="ES256")
    assert json.loads(verifier.payload) == payload
    # A wrong signature must fail.
    bad = signing_input + "." + b64url(bytes(64))
    try:
        other = jws.JWS()
        other.deserialize(bad)
        other.verify(jwk.JWK(**public["jwk"]), alg="ES256")
        print("bad signature accepted")
        return 1
    except jws.InvalidJWSSignature:
        pass
    assert agent.call("verify", {"kid": "third-party", "data": signing_input.encode(),
                                 "signature": signed["signature"]})["valid"] is True
    print("jws verified")

    # Every algorithm the token supports: a compact JWS that jwcrypto accepts with the JWK.
    for alg in caps["supported_algs"]:
        kid = "third-party-" + alg.lower()
        # RSA key generation can take seconds on a busy machine.
        agent.call("generate_key", {"kid": kid, "alg": alg, "timeout_ms": 120000})
        header = {"alg": alg, "kid": kid}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(payload, separators=(",", ":")).encode()))
        signed = agent.call("sign", {"kid": kid, "data": signing_input.encode(), "alg": alg})
        public = agent.call("get_public_key", {"kid": kid})
        verifier = jws.JWS()
        verifier.deserialize(signing_input + "." + b64url(signed["signature"]))
        verifier.verify(jwk.JWK(**public["jwk"]), alg=alg)
        print(f"jws verified: {alg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
