"""Envoy-style SDS client written with grpcio + xds-protos (a client we did not write).

Usage: sds_client.py SOCKET SCENARIO

Prints one JSON object per line describing what it saw; the Rust test asserts on them.
Scenarios:
  rotate     request default + ROOTCA, check them, ACK, wait for a pushed update (short TTL),
             ACK it, NACK the next one and count responses for a while (must not loop).
  stale      request, then send a request with a stale nonce (must be ignored), then ACK.
  unknown    request an unknown resource name (expect NOT_FOUND).
"""
import json
import queue
import sys
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NODE = base_pb2.Node(id="sidecar~127.0.0.1~test.default~default.svc.cluster.local", cluster="test")


def emit(**kw):
    print(json.dumps(kw), flush=True)


class Stream:
    def __init__(self, sock):
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        self.call = self.stub.StreamSecrets(self._gen())
        threading.Thread(target=self._read, daemon=True).start()

    def _gen(self):
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self):
        try:
            for r in self.call:
                self.responses.put(("resp", r))
        except grpc.RpcError as e:
            self.responses.put(("error", e))

    def send(self, names, version="", nonce="", error=None):
        req = discovery_pb2.DiscoveryRequest(
            node=NODE, resource_names=names, type_url=TYPE, version_info=version, response_nonce=nonce
        )
        if error is not None:
            req.error_detail.CopyFrom(error)
        self.requests.put(req)

    def recv(self, timeout):
        try:
            kind, v = self.responses.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == "error":
            raise v
        return v

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def describe(resp):
    out = {"version": resp.version_info, "nonce": resp.nonce, "type_url": resp.type_url, "secrets": {}}
    for any_ in resp.resources:
        s = secret_pb2.Secret()
        assert any_.Unpack(s), any_.type_url
        if s.HasField("tls_certificate"):
            chain_pem = s.tls_certificate.certificate_chain.inline_bytes
            key_pem = s.tls_certificate.private_key.inline_bytes
            certs = x509.load_pem_x509_certificates(chain_pem)
            leaf = certs[0]
            key = serialization.load_pem_private_key(key_pem, password=None)
            pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            out["secrets"][s.name] = {
                "kind": "tls_certificate",
                "uris": san.get_values_for_type(x509.UniformResourceIdentifier),
                "serial": format(leaf.serial_number, "x"),
                "chain_len": len(certs),
                "key_matches": pub(key.public_key()) == pub(leaf.public_key()),
                "issuer": leaf.issuer.rfc4514_string(),
                "not_after": leaf.not_valid_after_utc.timestamp(),
            }
        elif s.HasField("validation_context"):
            roots = x509.load_pem_x509_certificates(s.validation_context.trusted_ca.inline_bytes)
            out["secrets"][s.name] = {
                "kind": "validation_context",
                "roots": [r.subject.rfc4514_string() for r in roots],
                "fingerprints": [r.fingerprint(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()).hex() for r in roots],
            }
    return out


def rotate(sock):
    st = Stream(sock)
    names = ["default", "ROOTCA"]
    st.send(names)
    r1 = st.recv(15)
    emit(event="first", **describe(r1))
    st.send(names, r1.version_info, r1.nonce)  # ACK
    # Nothing may come back for the ACK itself; the next response is the rotation push.
    r2 = st.recv(20)
    if r2 is None:
        emit(event="no_push")
        return
    emit(event="pushed", **describe(r2))
    # NACK this one: the server must log it and not resend it in a loop.
    st.send(names, r1.version_info, r2.nonce, status_pb2.Status(code=3, message="test client rejects this secret"))
    count = 0
    deadline = time.time() + 1.5
    while time.time() < deadline:
        r = st.recv(max(0.0, deadline - time.time()))
        if r is not None:
            count += 1
            # keep acking anything new, as Envoy would
            st.send(names, r.version_info, r.nonce)
    emit(event="after_nack", responses=count)
    st.close()


def stale(sock):
    st = Stream(sock)
    names = ["default", "ROOTCA"]
    st.send(names)
    r1 = st.recv(15)
    emit(event="first", **describe(r1))
    # A request naming a different resource set but an old/unknown nonce: stale, ignored.
    st.send(["ROOTCA"], "", "not-a-nonce-we-sent")
    r = st.recv(1.0)
    emit(event="after_stale", responses=0 if r is None else 1)
    # A proper change of subscription (current nonce) is answered with the new set.
    st.send(["ROOTCA"], r1.version_info, r1.nonce)
    r3 = st.recv(5)
    emit(event="resubscribed", **describe(r3))
    st.close()


def unknown(sock):
    st = Stream(sock)
    st.send(["default", "no-such-secret"])
    try:
        r = st.recv(10)
        emit(event="unexpected_response", got=None if r is None else r.version_info)
    except grpc.RpcError as e:
        emit(event="error", code=e.code().name, message=e.details())


if __name__ == "__main__":
    {"rotate": rotate, "stale": stale, "unknown": unknown}[sys.argv[2]](sys.argv[1])
