"""A steady stream of real HTTP requests to the VIP while a flood runs: what legitimate users feel.

`python3 -m benchmarks.probe --target VIP --seconds S` starts one request every --interval seconds,
each in its own thread (a slow or failing one does not delay the next) and bounded by --timeout, and
prints one JSON object: attempts, completions, connect-time percentiles and the first distinct errors.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from synproxy.lab.clients import http_get, percentile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--source-port-from", type=int,
                        help="request N uses this port + N (default: the kernel picks, and may reuse)")
    args = parser.parse_args()
    if not 0 < args.seconds <= 600 or args.interval <= 0 or args.timeout <= 0:
        parser.error("--seconds must be in (0, 600], --interval and --timeout positive")
    if args.source_port_from is not None and not 1024 <= args.source_port_from <= 65535 - args.seconds / args.interval:
        parser.error("--source-port-from leaves no room for one port per request")
    connect_times, errors = [], []

    def attempt(index: int) -> None:
        source_port = None if args.source_port_from is None else args.source_port_from + index
        try:
            connect_times.append(http_get(args.target, args.port, args.timeout, source_port)[0])
        except (OSError, ValueError) as error:
            errors.append(str(error))

    started = time.monotonic()
    threads: list[threading.Thread] = []
    while (now := time.monotonic()) < started + args.seconds:
        if (wait := started + len(threads) * args.interval - now) > 0:
            time.sleep(wait)
        threads.append(threading.Thread(target=attempt, args=(len(threads),)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    print(json.dumps({
        "attempts": len(threads), "completed": len(connect_times), "errors": sorted(set(errors))[:5],
        "connect_p50_ms": round(1000 * percentile(connect_times, 0.5), 2) if connect_times else None,
        "connect_p99_ms": round(1000 * percentile(connect_times, 0.99), 2) if connect_times else None,
    }))


if __name__ == "__main__":
    main()
