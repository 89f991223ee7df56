"""An external authorization service for tests/ext_authz_e2e.rs: Envoy's gRPC API
(envoy.service.auth.v3.Authorization, from PyPI's xds-protos, served by grpcio) and the HTTP
flavour Istio's envoyExtAuthzHttp speaks (Python's http.server), with the same rule:

- `x-user: alice` is allowed; the answer adds `x-authz-user: alice` for the app, removes
  `x-secret` from the request and adds `x-checked: yes` to the client's response;
- `x-user: root` likewise, with `x-authz-user: admin`;
- `x-user: big` (HTTP only) is denied with 403 and a 100 KiB body;
- `x-user: crash` (HTTP only) gets 503 with an internal-looking body, as a provider failing;
- anything else is denied with 418, `x-deny-reason: not alice` and the body `who are you?`;
- `x-swap-token: T` (gRPC only) is allowed with `authorization: Bearer T` set for the app;
- `x-user: setremove` is allowed with headers both set and removed: HTTP sets `x-authz-user: sr`
  and lists it in `x-envoy-auth-headers-to-remove`; gRPC sets `x-authz-user`, overwrites
  `x-keep` if present, adds `x-absent` if absent, and removes all three (Envoy removes last);
- `x-user: appender` (gRPC only) is allowed with headers in the deprecated `append` form:
  `x-list: two`, `x-absent: one`, `cookie: c=3` and an empty `x-empty` appended,
  `x-keep: provider` replacing;
- a TCP connection (gRPC, no HTTP attributes) is allowed when the caller has a SPIFFE ID.

Every check it receives is appended, as one JSON line, to the file named by its third
argument, so the test can see what the proxy sent (with the body, when the proxy sent one) (for gRPC, with the `x-forwarded-client-cert`
metadata a proxy in front of this service added).

Usage: ext_authz_server.py HTTP_PORT GRPC_PORT LOG
Prints "ready" once both listen.
"""

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2, status_pb2

HTTP_PORT, GRPC_PORT, LOG = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()


def record(entry):
    with lock, open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        record(
            {
                "kind": "http",
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body": body.decode("latin-1"),
            }
        )
        user = headers.get("x-user")
        if user in ("big", "crash"):
            body = b"x" * 100 * 1024 if user == "big" else b"db 10.0.0.5 down"
            self.send_response(403 if user == "big" else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif user == "setremove":
            self.send_response(200)
            self.send_header("x-authz-user", "sr")
            self.send_header("x-envoy-auth-headers-to-remove", "x-authz-user")
            self.send_header("content-length", "0")
            self.end_headers()
        elif user in ("alice", "root"):
            self.send_response(200)
            self.send_header("x-authz-user", "admin" if user == "root" else "alice")
            self.send_header("x-envoy-auth-headers-to-remove", "x-secret")
            self.send_header("x-checked", "yes")
            self.send_header("x-not-listed", "dropped")
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            body = b"who are you?"
            self.send_response(418)
            self.send_header("x-deny-reason", "not alice")
            self.send_header("x-not-listed", "dropped")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any

    def log_message(self, *args):
        pass


def header(key, value):
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(self, request, context):
        a = request.attributes
        if not a.request.HasField("http"):
            # A TCP connection: only the peers are known. Callers with a mesh identity pass.
            record(
                {
                    "kind": "tcp",
                    "source_principal": a.source.principal,
                    "destination_principal": a.destination.principal,
                }
            )
            allowed = a.source.principal.startswith("spiffe://")
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK if allowed else code_pb2.PERMISSION_DENIED)
            )
        http = a.request.http
        record(
            {
                "kind": "grpc",
                "method": http.method,
                "path": http.path,
                "host": http.host,
                "protocol": http.protocol,
                "headers": dict(http.headers),
                "source_principal": a.source.principal,
                "source_address": a.source.address.socket_address.address,
                "destination_principal": a.destination.principal,
                "xfcc": dict(context.invocation_metadata()).get("x-forwarded-client-cert", ""),
                "body": http.body,
                "raw_body_hex": http.raw_body.hex(),
                "size": http.size,
            }
        )
        swap = http.headers.get("x-swap-token")
        if swap:
            # Replaces the client's credentials (what oauth2-proxy-like providers do).
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[header("authorization", "Bearer " + swap)],
                ),
            )
        user = http.headers.get("x-user")
        if user == "appender":
            def deprecated(key, value, append):
                return base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=key, value=value),
                    append=wrappers_pb2.BoolValue(value=append),
                )

            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        deprecated("x-list", "two", True),
                        deprecated("x-keep", "provider", False),
                        deprecated("x-absent", "one", True),
                        deprecated("cookie", "c=3", True),
                        deprecated("x-empty", "", True),
                    ],
                ),
            )
        if user == "setremove":
            def action(key, value, a):
                return base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=key, value=value), append_action=a
                )

            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        header("x-authz-user", "sr"),
                        action("x-keep", "provider", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS),
                        action("x-absent", "one", base_pb2.HeaderValueOption.ADD_IF_ABSENT),
                    ],
                    headers_to_remove=["x-authz-user", "x-keep", "x-absent"],
                ),
            )
        if user in ("alice", "root"):
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        header("x-authz-user", "admin" if user == "root" else "alice"),
                        # What a provider must not be able to vouch for: the proxy's own.
                        header("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y"),
                    ],
                    headers_to_remove=["x-secret"],
                    response_headers_to_add=[header("x-checked", "yes")],
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="not alice"),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=418),
                headers=[header("x-deny-reason", "not alice")],
                body="who are you?",
            ),
        )


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(), server)
    server.add_insecure_port(f"127.0.0.1:{GRPC_PORT}")
    server.start()
    httpd = ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Http)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
