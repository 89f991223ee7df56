"""What the SPIFFE Workload API answers when the workload has no valid SVID.

Usage: workload_errors.py SOCKET probe
         py-spiffe's fetch_x509_svid, then raw FetchX509SVID / FetchX509Bundles /
         FetchJWTSVID (with the security header): one JSON line each with the gRPC code.
       workload_errors.py SOCKET stream
         one raw FetchX509SVID stream: a line per message, then how it ended; then a probe.
Every call has a deadline, so a silent server shows up as DEADLINE_EXCEEDED, never a hang.
"""
import json
import sys
import time

import grpc
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

HEADER = [("workload.spiffe.io", "true")]


def emit(**kw):
    print(json.dumps(kw), flush=True)


def probe(sock):
    with WorkloadApiClient(socket_path=f"unix://{sock}") as client:
        t = time.monotonic()
        try:
            svid = client.fetch_x509_svid(timeout=5)
            emit(event="py_spiffe", code="OK", serial=format(svid.leaf.serial_number, "x"))
        except Exception as e:  # py-spiffe wraps the gRPC error
            cause = e.__cause__
            code = cause.code().name if isinstance(cause, grpc.Call) else type(e).__name__
            emit(event="py_spiffe", code=code, message=str(e), elapsed=time.monotonic() - t)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{sock}"))
    calls = [
        ("x509", lambda: next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)))),
        ("bundles", lambda: next(iter(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=5)))),
        ("jwt", lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER, timeout=5)),
    ]
    for name, call in calls:
        t = time.monotonic()
        try:
            call()
            emit(event=name, code="OK")
        except grpc.RpcError as e:
            emit(event=name, code=e.code().name, message=e.details(), elapsed=time.monotonic() - t)


def stream(sock):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{sock}"))
    try:
        for resp in stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30):
            emit(event="svid", spiffe_id=resp.svids[0].spiffe_id)
        emit(event="end", code="OK")
    except grpc.RpcError as e:
        emit(event="end", code=e.code().name, message=e.details())
    probe(sock)


sock, mode = sys.argv[1], sys.argv[2]
{"probe": probe, "stream": stream}[mode](sock)
