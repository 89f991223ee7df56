"""A WebSocket app for tests/websocket_e2e.rs, on PyPI's `websockets`.

Usage: ws_app.py PORT. Listens on 127.0.0.1:PORT and prints "ready". Each connection first
gets one text message "path=<request path> xfcc=<x-forwarded-client-cert or ->", then every
message it sends comes back as it is, until it closes.
"""

import sys

from websockets.sync.server import serve


def handler(ws):
    req = ws.request
    xfcc = req.headers.get("x-forwarded-client-cert", "-")
    ws.send(f"path={req.path} xfcc={xfcc}")
    for message in ws:
        ws.send(message)


def main():
    port = int(sys.argv[1])
    with serve(handler, "127.0.0.1", port, compression=None) as server:
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
