#!/usr/bin/env python3
"""A CreateCertificate client Rampart did not write: grpcio with stubs generated at run time
by grpc_tools.protoc from proto/proto/security/v1alpha1/ca.proto, and `cryptography` for keys,
CSRs, tokens and an external test CA. Driven by tests/ca_python.rs.

Subcommands:
  issuer   make an ES256 token-signing key and its JWKS
  token    mint a JWT with that key
  ca       make an external root + intermediate (Istio cacerts layout)
  request  call CreateCertificate and check the outcome (exit 0 when it matched --expect)
"""

import argparse
import atexit
import base64
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto", "proto")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- tokens -----------------------------------------------------------------------------


def cmd_issuer(a):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(a.out_key, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    nums = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "kid": a.kid, "alg": "ES256", "use": "sig",
           "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big"))}
    with open(a.out_jwks, "w") as f:
        json.dump({"keys": [jwk]}, f)


def cmd_token(a):
    with open(a.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    now = int(time.time())
    claims = {"iss": a.iss, "aud": [a.aud], "iat": now, "exp": now + a.exp_in}
    if a.sub:
        claims["sub"] = a.sub
    header = {"alg": "ES256", "kid": a.kid, "typ": "JWT"}
    signing_input = (b64url(json.dumps(header).encode()) + "." +
                     b64url(json.dumps(claims).encode())).encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    print(signing_input.decode() + "." + b64url(sig))


# --- an external CA (Istio plug-in layout) -----------------------------------------------


def _ca_cert(subject, issuer, pub, signer, path_len, days, issuer_pub=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if issuer_pub is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub),
                            critical=False)
    return b.sign(signer, hashes.SHA256())


def cmd_ca(a):
    os.makedirs(a.out, exist_ok=True)
    if a.rsa:
        root_key = rsa.generate_private_key(65537, 2048)
        int_key = rsa.generate_private_key(65537, 2048)
    else:
        root_key = ec.generate_private_key(ec.SECP256R1())
        int_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                           x509.NameAttribute(NameOID.COMMON_NAME, f"{a.name} Root CA")])
    int_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{a.name} Intermediate CA")])
    root = _ca_cert(root_name, root_name, root_key.public_key(), root_key, None, 3650)
    inter = _ca_cert(int_name, root_name, int_key.public_key(), root_key, 0, 730,
                     issuer_pub=root_key.public_key())
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    # Keys in the "traditional" encodings Istio's tools write (SEC1 / PKCS#1).
    key_pem = int_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    files = {"root-cert.pem": pem(root), "ca-cert.pem": pem(inter), "ca-key.pem": key_pem,
             "cert-chain.pem": pem(inter) + pem(root),
             "root-key.pem": root_key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())}
    for name, data in files.items():
        with open(os.path.join(a.out, name), "wb") as f:
            f.write(data)


# --- CreateCertificate --------------------------------------------------------------------


def load_stubs():
    from grpc_tools import protoc
    import grpc_tools
    out = tempfile.mkdtemp(prefix="rampart-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{wkt}", f"--python_out={out}",
                      f"--grpc_python_out={out}",
                      os.path.join(PROTO_DIR, "security", "v1alpha1", "ca.proto")])
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, out)
    from security.v1alpha1 import ca_pb2, ca_pb2_grpc  # noqa: E402
    return ca_pb2, ca_pb2_grpc


def make_csr(spiffe_id):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def foreign_client_cert(spiffe_id, tmp):
    """A SPIFFE client certificate from a CA the server does not trust."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Root")])
    ca = _ca_cert(name, name, ca_key.public_key(), ca_key, None, 10)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (leaf.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def split_pem(text):
    out, cur = [], []
    for line in text.splitlines():
        cur.append(line)
        if line.startswith("-----END"):
            out.append("\n".join(cur) + "\n")
            cur = []
    return out


def cmd_request(a):
    import grpc
    ca_pb2, ca_pb2_grpc = load_stubs()
    with open(a.root, "rb") as f:
        root = f.read()
    cert_chain = key_pem = None
    if a.foreign_client_cert:
        cert_chain, key_pem = foreign_client_cert(a.spiffe_id, None)
    elif a.client_cert:
        with open(a.client_cert, "rb") as f:
            cert_chain = f.read()
        with open(a.client_key, "rb") as f:
            key_pem = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key_pem,
                                         certificate_chain=cert_chain)
    channel = grpc.secure_channel(a.addr, creds,
                                  options=[("grpc.ssl_target_name_override", a.server_name)])
    stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)

    if a.csr_mode == "garbage":
        key, csr = None, "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n"
    else:
        key, csr = make_csr(a.csr_id or a.spiffe_id)
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=a.ttl)
    md = [("clusterid", "Kubernetes")]
    if a.token:
        with open(a.token) as f:
            md.append(("authorization", "Bearer " + f.read().strip()))
    try:
        resp = stub.CreateCertificate(req, metadata=md, timeout=10)
    except grpc.RpcError as e:
        got = e.code().name
        print(f"refused: {got}: {e.details()}")
        if a.expect == "ok":
            sys.exit(1)
        if got != a.expect:
            print(f"expected {a.expect}")
            sys.exit(1)
        if a.message and a.message not in (e.details() or ""):
            print(f"expected message containing {a.message!r}")
            sys.exit(1)
        return
    if a.expect != "ok":
        print(f"expected {a.expect} but got a certificate")
        sys.exit(1)

    chain = list(resp.cert_chain)
    assert len(chain) >= 2, f"chain must not be leaf-only: {len(chain)} elements"
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [a.spiffe_id], f"URI SANs {uris} != [{a.spiffe_id}]"
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers(), \
        "certificate is not for our key"
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if a.ttl:
        assert lifetime.total_seconds() <= a.ttl + 1, f"lifetime {lifetime} above {a.ttl}s"
    # openssl verify against the root this client holds (not the one in the response).
    with tempfile.TemporaryDirectory() as d:
        leaf_f, inter_f = os.path.join(d, "leaf.pem"), os.path.join(d, "inter.pem")
        with open(leaf_f, "w") as f:
            f.write(chain[0])
        inter = "".join(chain[1:-1])
        args = ["openssl", "verify", "-purpose", "sslclient", "-CAfile", a.verify_root or a.root]
        if inter:
            with open(inter_f, "w") as f:
                f.write(inter)
            args += ["-untrusted", inter_f]
        out = subprocess.run(args + [leaf_f], capture_output=True, text=True)
        print("openssl:", out.stdout.strip(), out.stderr.strip())
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), "openssl verify failed"
    if a.out_chain:
        with open(a.out_chain, "w") as f:
            f.write("".join(chain[:-1]))
    if a.out_key:
        with open(a.out_key, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        os.chmod(a.out_key, 0o600)
    if a.out_roots:
        with open(a.out_roots, "w") as f:
            f.write(chain[-1])
    print(f"issued: {leaf.serial_number:x} {a.spiffe_id} chain={len(chain)} "
          f"roots_in_last={len(split_pem(chain[-1]))}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("issuer")
    s.add_argument("--out-key", required=True)
    s.add_argument("--out-jwks", required=True)
    s.add_argument("--kid", default="k1")
    s = sub.add_parser("token")
    s.add_argument("--key", required=True)
    s.add_argument("--kid", default="k1")
    s.add_argument("--iss", required=True)
    s.add_argument("--sub")
    s.add_argument("--aud", default="istio-ca")
    s.add_argument("--exp-in", type=int, default=600)
    s = sub.add_parser("ca")
    s.add_argument("--name", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--rsa", action="store_true")
    s = sub.add_parser("request")
    s.add_argument("--addr", required=True)
    s.add_argument("--root", required=True, help="roots this client trusts for the CA")
    s.add_argument("--verify-root", help="roots to verify the issued chain with (default --root)")
    s.add_argument("--server-name", default="istiod.istio-system.svc")
    s.add_argument("--token")
    s.add_argument("--client-cert")
    s.add_argument("--client-key")
    s.add_argument("--foreign-client-cert", action="store_true")
    s.add_argument("--spiffe-id", required=True)
    s.add_argument("--csr-id", help="identity to put in the CSR (default --spiffe-id)")
    s.add_argument("--csr-mode", choices=["good", "garbage"], default="good")
    s.add_argument("--ttl", type=int, default=0)
    s.add_argument("--expect", default="ok")
    s.add_argument("--message")
    s.add_argument("--out-chain")
    s.add_argument("--out-key")
    s.add_argument("--out-roots")
    a = p.parse_args()
    {"issuer": cmd_issuer, "token": cmd_token, "ca": cmd_ca, "request": cmd_request}[a.cmd](a)


if __name__ == "__main__":
    main()
