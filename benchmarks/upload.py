"""One bulk upload to the VIP: an HTTP POST of --bytes to nginx's /upload (synproxy/lab/nginx.py), which
reads and discards the body.

`python3 -m benchmarks.upload --target VIP --bytes N --seconds S` prints one JSON object: the bytes
sent, the seconds from connect to the server's close, and the throughput. nginx may answer 204 before
the body is in, but closes only once it has read all of it (a request without keep-alive): the close is
the end. A transfer still running after --seconds stops there (`complete`: false) and counts what was
sent by then.
"""

from __future__ import annotations

import argparse
import json
import time

from synproxy.lab.clients import connect
from synproxy.lab.nginx import UPLOAD_PATH

CHUNK = 1 << 18


def upload(target: str, port: int, size: int, seconds: float) -> dict:
    chunk = bytes(CHUNK)
    started = time.monotonic()
    deadline = started + seconds
    sent = 0
    with connect(target, port, seconds, None) as sock:
        sock.sendall(f"POST {UPLOAD_PATH} HTTP/1.0\r\nHost: {target}\r\nContent-Length: {size}\r\n\r\n".encode())
        while sent < size and time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sent += sock.send(chunk[:min(CHUNK, size - sent)])
            except TimeoutError:
                break
        if sent < size:
            return {"bytes": sent, "seconds": round(time.monotonic() - started, 3), "complete": False}
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        answer = b""
        while piece := sock.recv(4096):
            answer += piece
    elapsed = time.monotonic() - started
    if not answer.startswith((b"HTTP/1.1 204 ", b"HTTP/1.0 204 ")):
        raise ValueError(f"unexpected answer {answer[:40]!r}")
    return {"bytes": sent, "seconds": round(elapsed, 3), "complete": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    if args.bytes <= 0 or not 0 < args.seconds <= 600:
        parser.error("--bytes must be positive, --seconds in (0, 600]")
    try:
        result = upload(args.target, args.port, args.bytes, args.seconds)
    except (OSError, ValueError, KeyError) as error:
        result = {"bytes": 0, "seconds": args.seconds, "complete": False, "error": str(error)}
    result["mb_per_second"] = round(result["bytes"] / 1e6 / result["seconds"], 1) if result["seconds"] else 0.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
