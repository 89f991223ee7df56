"""A WebSocket client for tests/websocket_e2e.rs, on PyPI's `websockets`.

Usage: ws_client.py URL MODE ADDR [PAUSE]
  MODE direct:  connect to ADDR (host:port) and send the handshake there, Host from URL
                (an HTTP proxy that routes by Host, or an inbound port);
  MODE connect: use ADDR as an HTTP proxy (CONNECT host:port, then the handshake);
  PAUSE:        seconds to wait, silent, between the first echo and the second.
Prints one JSON line: {"greeting": ..., "echo": [...]} or {"status": <HTTP status>} when
the handshake is refused, or {"error": ...}.
"""

import json
import socket
import sys
import time

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


def main():
    url, mode, addr = sys.argv[1], sys.argv[2], sys.argv[3]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    host, port = addr.rsplit(":", 1)
    kwargs = {"compression": None, "open_timeout": 10, "ping_interval": None}
    if mode == "direct":
        kwargs["sock"] = socket.create_connection((host, int(port)), timeout=10)
        kwargs["proxy"] = None
    else:
        kwargs["proxy"] = f"http://{addr}"
    try:
        with connect(url, **kwargs) as ws:
            greeting = ws.recv(timeout=10)
            echoes = []
            ws.send("hello")
            echoes.append(ws.recv(timeout=10))
            if pause:
                time.sleep(pause)
            big = "x" * 200_000
            ws.send(big)
            echoes.append("big" if ws.recv(timeout=10) == big else "big mismatch")
            ws.send(b"\x00\x01binary")
            echoes.append(repr(ws.recv(timeout=10)))
        print(json.dumps({"greeting": greeting, "echo": echoes}))
    except InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code}))
    except Exception as e:  # noqa: BLE001 - the test prints whatever went wrong
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))


if __name__ == "__main__":
    main()
