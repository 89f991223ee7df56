#!/usr/bin/env python3
"""Open N HTTP/1.1 keep-alive connections to HOST:PORT, send one request on each, read its
response, and hold them all open until killed (SIGTERM).

Usage: hold-conns.py HOST PORT N [HOSTHEADER]
Prints "held N" on stdout once every connection has had its response (exit 1 on failure).
At most 32 requests are in flight at once. (Since issue #15 session 6 the backend proxy
holds one app connection per downstream HTTP/1.1 connection, so the app sees N.)
"""
import resource
import selectors
import signal
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hosthdr = sys.argv[4] if len(sys.argv) > 4 else f"{host}:{port}"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 64
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
req = f"GET / HTTP/1.1\r\nHost: {hosthdr}\r\n\r\n".encode()
held = []
sel = selectors.DefaultSelector()
pending = {}  # sock -> bytes received
started = 0
WINDOW = 32


def start_one():
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(req)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    pending[s] = b""


while len(held) < n:
    while started < n and len(pending) < WINDOW:
        start_one()
        started += 1
    events = sel.select(timeout=30)
    if not events:
        print(f"timeout with {len(pending)} responses pending", file=sys.stderr)
        sys.exit(1)
    for key, _ in events:
        s = key.fileobj
        data = s.recv(65536)
        if not data:
            print(f"connection closed before its response ({len(held)} held)", file=sys.stderr)
            sys.exit(1)
        buf = pending[s] + data
        head, sep, body = buf.partition(b"\r\n\r\n")
        if not sep:
            pending[s] = buf
            continue
        if not head.startswith(b"HTTP/1.1 200"):
            print(f"unexpected response: {head[:80]!r}", file=sys.stderr)
            sys.exit(1)
        clen = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                clen = int(v)
        if len(body) < clen:
            pending[s] = buf
            continue
        sel.unregister(s)
        del pending[s]
        held.append(s)
print(f"held {len(held)}", flush=True)
try:
    while True:
        signal.pause()
except KeyboardInterrupt:
    pass
