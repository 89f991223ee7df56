#!/usr/bin/env python3
"""A rampart.ca.v1.Revocation/GetCrls client Rampart did not write: grpcio with stubs generated
at run time by grpc_tools.protoc from proto/proto/rampart/ca/v1/revocation.proto, and
`cryptography` to parse the DER CRLs and check each one's signature. Driven by
tests/ca_revoke_e2e.rs.

  getcrls --addr A --root ROOTS.pem (--token FILE | --client-cert C --client-key K)
          [--if-none-match ETAG] [--expect ok|UNAUTHENTICATED]
prints one JSON object: version, etag, not_modified, next_update, and per CRL its issuer,
number, nextUpdate, revoked serials (hex) and whether its signature verifies with a
certificate of --root / --issuers.
"""

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile

from cryptography import x509

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto", "proto")


def load_stubs():
    from grpc_tools import protoc
    import grpc_tools
    out = tempfile.mkdtemp(prefix="rampart-crl-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{wkt}", f"--python_out={out}",
                      f"--grpc_python_out={out}",
                      os.path.join(PROTO_DIR, "rampart", "ca", "v1", "revocation.proto")])
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, out)
    from rampart.ca.v1 import revocation_pb2, revocation_pb2_grpc  # noqa: E402
    return revocation_pb2, revocation_pb2_grpc


def cmd_getcrls(a):
    import grpc
    pb2, pb2_grpc = load_stubs()
    with open(a.root, "rb") as f:
        root = f.read()
    chain = key = None
    if a.client_cert:
        with open(a.client_cert, "rb") as f:
            chain = f.read()
        with open(a.client_key, "rb") as f:
            key = f.read()
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                         certificate_chain=chain)
    channel = grpc.secure_channel(a.addr, creds,
                                  options=[("grpc.ssl_target_name_override", a.server_name)])
    stub = pb2_grpc.RevocationStub(channel)
    md = []
    if a.token:
        with open(a.token) as f:
            md.append(("authorization", "Bearer " + f.read().strip()))
    try:
        resp = stub.GetCrls(pb2.GetCrlsRequest(if_none_match=a.if_none_match), metadata=md,
                            timeout=10)
    except grpc.RpcError as e:
        print(json.dumps({"error": e.code().name, "message": e.details()}))
        sys.exit(0 if a.expect == e.code().name else 1)
    if a.expect != "ok":
        print(json.dumps({"error": f"expected {a.expect} but got an answer"}))
        sys.exit(1)
    issuers = x509.load_pem_x509_certificates(root)
    if a.issuers:
        with open(a.issuers, "rb") as f:
            issuers += x509.load_pem_x509_certificates(f.read())
    crls = []
    for der in resp.crls:
        crl = x509.load_der_x509_crl(der)
        signer = [c for c in issuers if c.subject == crl.issuer]
        ok = any(crl.is_signature_valid(c.public_key()) for c in signer)
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        crls.append({
            "issuer": crl.issuer.rfc4514_string(),
            "number": number,
            "next_update": crl.next_update_utc.isoformat(),
            "revoked": [format(r.serial_number, "x") for r in crl],
            "signature_ok": ok,
        })
    print(json.dumps({"version": resp.version, "etag": resp.etag,
                      "not_modified": resp.not_modified, "next_update": resp.next_update,
                      "crls": crls}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("getcrls")
    s.add_argument("--addr", required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--issuers")
    s.add_argument("--server-name", default="istiod.istio-system.svc")
    s.add_argument("--token")
    s.add_argument("--client-cert")
    s.add_argument("--client-key")
    s.add_argument("--if-none-match", default="")
    s.add_argument("--expect", default="ok")
    a = p.parse_args()
    {"getcrls": cmd_getcrls}[a.cmd](a)


if __name__ == "__main__":
    main()
