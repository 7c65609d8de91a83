"""The lab backends' real servers: HTTP that reports who connected and what TCP negotiated, and echo.

`python3 -m synproxy.lab.servers --name be0` (run inside a backend's namespace). The HTTP answer is
JSON: {"backend", "client", "tcp_info"} so a test can see the real client address and the options.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from synproxy.tcpinfo import negotiated


class _Http(BaseHTTPRequestHandler):
    server_version = "synproxy-lab"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        body = json.dumps({"backend": self.server.backend_name,
                           "client": f"{self.client_address[0]}:{self.client_address[1]}",
                           "tcp_info": negotiated(self.connection)}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--echo-port", type=int, default=7)
    args = parser.parse_args()
    http = ThreadingHTTPServer(("0.0.0.0", args.http_port), _Http)
    http.daemon_threads = True
    http.backend_name = args.name
    echo = _EchoServer(("0.0.0.0", args.echo_port), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    print(json.dumps({"event": "servers_ready", "backend": args.name}), flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
