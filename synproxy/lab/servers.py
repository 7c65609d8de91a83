"""The lab backends' Python servers, for what nginx (synproxy/lab/nginx.py, port 80) cannot do: an HTTP
server that reports what TCP negotiated (nginx's $tcpinfo_* variables have no MSS, window scales, SACK,
timestamps or ECN), and echo.

`python3 -m synproxy.lab.servers --name be0` (run inside a backend's namespace). The HTTP answer is
JSON: {"backend", "client", "tcp_info"} so a test can see the real client address and the options.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from synproxy.tcpinfo import negotiated


class _Http(BaseHTTPRequestHandler):
    server_version = "synproxy-lab"
    protocol_version = "HTTP/1.0"

    def _report(self, **extra) -> bytes:
        """The JSON line: which backend, the client as the backend sees it, what TCP negotiated."""
        return json.dumps({"backend": self.server.backend_name,
                           "client": f"{self.client_address[0]}:{self.client_address[1]}", **extra,
                           "tcp_info": negotiated(self.connection)}).encode() + b"\n"

    def do_GET(self) -> None:
        body = self._report()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """An upload of Content-Length bytes, answered with the GET's JSON line (and "received") and then
        X-Download bytes: data both ways, more than a window each, and what TCP negotiated read on the same
        connection."""
        length = left = int(self.headers.get("Content-Length", 0))
        while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
            left -= len(chunk)
        body = self._report(received=length - left) + bytes(int(self.headers.get("X-Download", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


# socketserver listens with a backlog of 5: behind the backend's cookies a full accept queue resets
# new handshakes (docs/backend.md), and `ab -c 64` fails against such a server even without a proxy.
BACKLOG = socket.SOMAXCONN
# TCP Fast Open connections pending their client's ACK a listener holds (its TCP_FASTOPEN qlen); past it
# the kernel handles TFO SYNs as any SYN (docs/front.md, "TCP Fast Open"). The listener asks for TFO;
# the backend loader's keys and net.ipv4.tcp_fastopen decide whether it gets any. A test overflows a
# smaller one (--fastopen-queue).
FASTOPEN_QUEUE = 128


class _FastOpen:
    """A listener that accepts TCP Fast Open (set before listen(), as nginx's `fastopen=`)."""

    fastopen_queue = FASTOPEN_QUEUE

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, self.fastopen_queue)
        super().server_bind()


class _EchoServer(_FastOpen, socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = BACKLOG


class _HttpServer(_FastOpen, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG


def _v6_only(server_class):
    """The same server on IPv6 alone, so each family has its own listener and IPv4 clients keep
    their plain addresses."""
    class V6Only(server_class):
        address_family = socket.AF_INET6

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()
    return V6Only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--echo-port", type=int, default=7)
    parser.add_argument("--fastopen-queue", type=int, default=FASTOPEN_QUEUE, help="the listeners' TCP_FASTOPEN qlen")
    args = parser.parse_args()
    if args.fastopen_queue < 1:
        parser.error("--fastopen-queue must be at least 1")
    _FastOpen.fastopen_queue = args.fastopen_queue
    servers = []
    for any_address, wrap in (("0.0.0.0", lambda cls: cls), ("::", _v6_only)):
        try:
            http = wrap(_HttpServer)((any_address, args.http_port), _Http)
            http.backend_name = args.name
            servers += [http, wrap(_EchoServer)((any_address, args.echo_port), _Echo)]
        except OSError as error:  # no IPv6 here (a Docker network without it): serve IPv4 alone
            print(json.dumps({"event": "family_unavailable", "address": any_address, "error": error.strerror}),
                  flush=True)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"event": "servers_ready", "backend": args.name}), flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
