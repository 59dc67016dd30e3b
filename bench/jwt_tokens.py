#!/usr/bin/env python3
"""Makes the JWT bench's keys and tokens with the openssl CLI (no Python packages needed).

Usage: jwt_tokens.py KEY.pem COUNT JWKS_OUT TOKENS_OUT
Writes the public key of KEY.pem (RSA) as a one-key JWKS (kid `bench`), and COUNT RS256
tokens, one a line, for users pool-0 .. pool-(COUNT-1), valid for two hours.
"""
import base64
import concurrent.futures
import json
import subprocess
import sys
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> None:
    key, count, jwks_out, tokens_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    modulus = subprocess.check_output(["openssl", "rsa", "-in", key, "-noout", "-modulus"])
    n = bytes.fromhex(modulus.decode().strip().split("=", 1)[1])
    jwks = {"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig",
                      "n": b64(n), "e": "AQAB"}]}
    with open(jwks_out, "w") as f:
        json.dump(jwks, f)
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
    now = int(time.time())

    def token(i: int) -> str:
        claims = {"sub": f"pool-{i}", "iss": "https://auth.bench", "aud": "shop",
                  "iat": now, "exp": now + 7200}
        signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key],
                             input=signing_input.encode(), capture_output=True,
                             check=True).stdout
        return f"{signing_input}.{b64(sig)}"

    # One openssl process per token: a few in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        tokens = list(pool.map(token, range(count)))
    with open(tokens_out, "w") as out:
        out.write("\n".join(tokens) + "\n")


if __name__ == "__main__":
    main()
