"""SPIFFE Workload API client using py-spiffe (PyPI `spiffe`), a client we did not write.

Usage: workload_client.py SOCKET
Prints JSON lines: the SVID py-spiffe fetched, the bundles, and what a call without the
security header gets.
"""
import json
import sys

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc


def emit(**kw):
    print(json.dumps(kw), flush=True)


sock = sys.argv[1]
with WorkloadApiClient(socket_path=f"unix://{sock}") as client:
    svid = client.fetch_x509_svid(timeout=15)
    leaf = svid.leaf
    pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    emit(
        event="svid",
        spiffe_id=str(svid.spiffe_id),
        chain_len=len(svid.cert_chain),
        serial=format(leaf.serial_number, "x"),
        key_matches=pub(svid.private_key.public_key()) == pub(leaf.public_key()),
    )
    bundles = client.fetch_x509_bundles(timeout=15)
    emit(
        event="bundles",
        trust_domains=sorted(str(b.trust_domain) for b in bundles.bundles),
        roots=sum(len(b.x509_authorities) for b in bundles.bundles),
    )

# Raw call without the workload.spiffe.io header: the spec says InvalidArgument.
channel = grpc.insecure_channel(f"unix:{sock}")
stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
try:
    next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5)))
    emit(event="no_header", code="OK")
except grpc.RpcError as e:
    emit(event="no_header", code=e.code().name, message=e.details())
# JWT calls: clear UNIMPLEMENTED.
try:
    stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=[("workload.spiffe.io", "true")], timeout=5)
    emit(event="jwt", code="OK")
except grpc.RpcError as e:
    emit(event="jwt", code=e.code().name, message=e.details())
