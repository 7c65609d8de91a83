"""Micro-benchmark of the cookie core and the front's handler: ns per call (CPython, one core, warm).

Run: python3 -m benchmarks.bench_cookie [--count N]. The anchor in the same run is one bare SipHash call,
the floor any Python MAC pays.
"""

from __future__ import annotations

import argparse
import os
import time

from siphash24 import siphash24

from synproxy.cookie import SynOptions, check_cookie, make_cookie
from synproxy.encap import encap_key
from synproxy.front.handler import FrontPolicy, handle
from synproxy.packet import ACK, SYN, build_tcp_options, build_tcp_packet, parse_tcp
from synproxy.salt import SaltSchedule


def per_call_ns(function, count: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(count):
        function()
    return (time.perf_counter_ns() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    count = parser.parse_args().count
    schedule = SaltSchedule((os.urandom(32),))
    now = time.time()
    epoch, salt = schedule.minting_salt(now)
    saddr, daddr = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 10])
    options = SynOptions(1460, 7, True, False)
    cookie = make_cookie(salt, epoch, saddr, daddr, 40000, 80, 1234, options)
    ack_packet = build_tcp_packet(saddr, daddr, 40000, 80, 1235, cookie + 1, ACK, 502)
    message = bytes(48)
    policy = FrontPolicy(vips=frozenset({daddr}), ports=frozenset({80}), farm_address=bytes([198, 18, 10, 2]),
                         backends=(bytes([198, 18, 20, 2]),), encap_port=6080,
                         encap_key=encap_key(schedule.secrets[0]),
                         flow_key=os.urandom(16))
    linux_syn = build_tcp_packet(saddr, daddr, 40000, 80, 1234, 0, SYN, 64240,
                                 build_tcp_options(1460, 7, True, (123456, 0)))

    def parse_and_validate():
        ack = parse_tcp(ack_packet)
        check_cookie(schedule, now, ack.saddr, ack.daddr, ack.sport, ack.dport, ack.seq - 1, ack.ack - 1)

    rows = [
        ("siphash24 of 48 bytes (anchor)", per_call_ns(lambda: siphash24(message, key=salt).intdigest(), count)),
        ("make_cookie", per_call_ns(lambda: make_cookie(salt, epoch, saddr, daddr, 40000, 80, 1234, options),
                                    count)),
        ("check_cookie (valid)", per_call_ns(lambda: check_cookie(schedule, now, saddr, daddr, 40000, 80,
                                                                  1234, cookie), count)),
        ("check_cookie (bad MAC)", per_call_ns(lambda: check_cookie(schedule, now, saddr, daddr, 40000, 80,
                                                                    1234, cookie ^ 0x400), count)),
        ("parse_tcp + check_cookie", per_call_ns(parse_and_validate, count)),
        ("handle: SYN -> SYN-ACK", per_call_ns(lambda: handle(linux_syn, now, schedule, policy), count)),
        ("handle: ACK -> validated, encapsulated", per_call_ns(lambda: handle(ack_packet, now, schedule, policy),
                                                               count)),
    ]
    print(f"{'operation':40} {'ns/call':>9}   ({count} calls each)")
    for name, ns in rows:
        print(f"{name:40} {ns:9.0f}")


if __name__ == "__main__":
    main()
