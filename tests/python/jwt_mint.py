"""Make signing keys and JWTs for tests/jwt_envoy_e2e.rs with PyJWT and cryptography.

Reads a JSON object from stdin:

    {"keys": {KEY: "RS256" | "ES256"}, "tokens": {NAME: SPEC}}

and makes one private key per KEY (kid = KEY). A SPEC is {"key": KEY, "claims": {...}} plus,
optionally, "alg" (default: the key's; "none" makes an unsigned token), "kid" (default KEY),
and "exp_in" / "nbf_in" / "iat_in": seconds from now, put in the claims as absolute times.

Prints {"jwks": {KEY: JWKS_TEXT}, "tokens": {NAME: TOKEN}} as JSON.
"""

import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

spec = json.load(sys.stdin)
now = int(time.time())
keys, jwks = {}, {}
for kid, alg in spec["keys"].items():
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.pop("key_ops", None)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    keys[kid] = (key, alg)
    jwks[kid] = json.dumps({"keys": [jwk]})

tokens = {}
for name, t in spec["tokens"].items():
    claims = dict(t.get("claims", {}))
    for field in ("exp", "nbf", "iat"):
        if field + "_in" in t:
            claims[field] = now + int(t[field + "_in"])
    key, alg = keys[t["key"]]
    alg = t.get("alg", alg)
    headers = {"kid": t.get("kid", t["key"])}
    if alg == "none":
        tokens[name] = jwt.encode(claims, None, algorithm="none", headers=headers)
    else:
        tokens[name] = jwt.encode(claims, key, algorithm=alg, headers=headers)
print(json.dumps({"jwks": jwks, "tokens": tokens}))
