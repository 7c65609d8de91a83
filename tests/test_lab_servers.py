"""The lab backends' HTTP server (synproxy/lab/servers.py), on loopback."""

from __future__ import annotations

import json
import socket
import threading

from synproxy.lab.servers import _Http, _HttpServer


def test_a_post_reports_what_it_received_with_the_gets_fields_even_without_a_content_length():
    """Before: a POST without Content-Length raised TypeError in the handler (the connection closed with no
    answer), and a POST's line lacked the GET's "client"."""
    server = _HttpServer(("127.0.0.1", 0), _Http)
    server.backend_name = "be0"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for request, received in ((b"POST / HTTP/1.0\r\nContent-Length: 5\r\nX-Download: 3\r\n\r\nhello", 5),
                                  (b"POST / HTTP/1.0\r\n\r\n", 0)):
            with socket.create_connection(server.server_address, timeout=5) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.0 200"), answer
            line, _, rest = answer.partition(b"\r\n\r\n")[2].partition(b"\n")
            report = json.loads(line)
            assert (report["backend"], report["received"]) == ("be0", received)
            assert report["client"].startswith("127.0.0.1:") and "tcp_info" in report
            assert rest == bytes(3 if received else 0)
    finally:
        server.shutdown()
        server.server_close()
