"""The floors for a Python front: every queued packet read and dropped, or read and sent back unparsed.

`python3 -m benchmarks.nfqueue_floor --queue N --vip ADDRESS --port P [--answer]` installs the front's
own chain (firewall.front_chain: notrack + NFQUEUE) and its queue binding, prints "ready", and reads
and drops (or answers) until SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys

from synproxy import firewall
from synproxy.front.service import bind_queue


def read_and_drop(packet) -> None:
    packet.get_payload()
    packet.drop()


def read_and_answer(packet) -> None:
    """Send the packet back towards its source, addresses swapped (both checksums stay valid): what a
    verdict with a new payload and its forwarding cost, with no parsing and no cookie."""
    payload = packet.get_payload()
    packet.set_payload(payload[:12] + payload[16:20] + payload[12:16] + payload[20:])
    packet.accept()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--vip", type=ipaddress.ip_address, required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--answer", action="store_true", help="send every packet back instead of dropping it")
    args = parser.parse_args()

    def stop(*_):
        raise SystemExit(0)  # raised inside the callback or the wait; run() passes it on

    signal.signal(signal.SIGTERM, stop)
    queue = bind_queue(args.queue, read_and_answer if args.answer else read_and_drop)
    rules = firewall.front_chain(args.queue)
    rules.install((args.vip,), tuple(args.port))
    try:
        print("ready", flush=True)
        queue.run()
    finally:
        rules.remove((args.vip,), tuple(args.port))
        queue.unbind()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
