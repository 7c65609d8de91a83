"""What TCP Fast Open costs the front's XDP program (`python3 -m benchmarks.front_tfo_cost`, root): ns
per SYN inside the program, with the kernel's run-time statistics, IPv4 and IPv6, for a SYN in Linux's
layout; the same SYN asking for a TFO cookie (its SYN-ACK then carries one: the option walk and one
SipHash-2-4 of the addresses more); a TFO SYN, a valid cookie and an HTTP request (the cookie checked,
a token of its source's budget, encapsulated to its backend; the budget made unlimited for the
measure, its lookup and update still paid); and the same SYN with an invalid cookie (checked against
both keys, then the cookie SYN-ACK with a fresh one: what a flood of forged TFO SYNs costs). The method
of benchmarks/front_xdp_cost.py, whose namespace and per-run measure it shares."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import statistics
import time

from benchmarks.front_xdp_cost import per_run
from synproxy import netns
from synproxy.bpf.libbpf import enable_run_time_stats, prog_test_run
from synproxy.bpf.loading import MAP_KEY, build_object
from synproxy.front.fastpath import _FASTOPEN_KEY, FastPath
from synproxy.front.handler import FrontPolicy
from synproxy.packet import SYN, FastOpen, build_tcp_options, build_tcp_packet
from synproxy.salt import SaltSchedule
from synproxy.tfo import fastopen_cookie, fastopen_keys

ADDRESSES = {4: ("198.18.1.2", "198.19.0.10"), 6: ("2001:db8:1::2", "2001:db8:ffff::10")}
ETHERNET = {4: bytes(12) + b"\x08\x00", 6: bytes(12) + b"\x86\xdd"}
PORT = 80
REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
# What each frame must move in the program's counters besides what it is named for.
COUNTED = {"SYN": {"syn_answered"}, "SYN asking for a TFO cookie": {"syn_answered", "fastopen_cookie_issued"},
           "TFO SYN, valid cookie": {"fastopen_accepted"},
           "TFO SYN, invalid cookie": {"syn_answered", "fastopen_cookie_issued", "fastopen_invalid_cookie"}}


def frames(policy: FrontPolicy) -> dict[str, bytes]:
    primary, _ = fastopen_keys(policy.tfo_secret, time.time(), policy.tfo_key_period)
    out = {}
    for family, (client, vip) in ADDRESSES.items():
        client, vip = ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed
        valid = FastOpen(fastopen_cookie(primary, client, vip), False)
        for name, fastopen, data in (("SYN", None, b""), ("SYN asking for a TFO cookie", FastOpen(b"", False), b""),
                                     ("TFO SYN, valid cookie", valid, REQUEST),
                                     ("TFO SYN, invalid cookie", FastOpen(bytes(8), False), REQUEST)):
            options = build_tcp_options(1460, 7, True, (1000, 0), fastopen)
            out[f"IPv{family} {name}"] = ETHERNET[family] + build_tcp_packet(client, vip, 40000, PORT, 1000, 0, SYN,
                                                                             64240, options, data)
    return out


def unlimited_budget(loaded: FastPath) -> None:
    """A token costs 1 ns of a 1 s burst: the runs never spend it."""
    fields = _FASTOPEN_KEY.unpack(loaded.fastopen_key.lookup(MAP_KEY.pack(0)))
    loaded.fastopen_key.update(MAP_KEY.pack(0), _FASTOPEN_KEY.pack(*fields[:4], 1, 10**9))


def measure(runs: int, repetitions: int) -> dict[str, list[float]]:
    policy = FrontPolicy(vips=frozenset(ipaddress.ip_address(vip).packed for _, vip in ADDRESSES.values()),
                         ports=frozenset({PORT}), farm_address=ipaddress.ip_address("10.99.0.1").packed,
                         backends=(ipaddress.ip_address("10.98.0.1").packed,), encap_port=6080,
                         encap_key=os.urandom(16), flow_key=os.urandom(16))
    policy = dataclasses.replace(policy, tfo_secret=os.urandom(32))
    schedule = SaltSchedule((os.urandom(32),), period=60, skew=2)
    results: dict[str, list[float]] = {}
    with netns.routed_namespace("tc") as name:
        for gateway in ("10.99.0.2", "fd00:99::2"):
            netns.run(name, ["ip", "neigh", "replace", gateway, "lladdr", "02:00:00:00:99:02", "dev", "tca", "nud",
                             "permanent"])
        loaded = FastPath(build_object("front"))
        stats = enable_run_time_stats()
        try:
            loaded.configure(policy, schedule)
            for _ in range(repetitions):
                loaded.refresh(policy, schedule, time.time())
                unlimited_budget(loaded)
                for kind, frame in frames(policy).items():
                    counted = loaded.counts("xdp")
                    with netns.inside(name):
                        prog_test_run(loaded.xdp_prog_fd, frame)
                    moved = {key[0] for key, value in loaded.counts("xdp").items() if value != counted[key]}
                    if moved != COUNTED[kind.split(" ", 1)[1]]:
                        raise SystemExit(f"{kind}: the program counted {moved}")
                    results.setdefault(kind, []).append(per_run(name, loaded.xdp_prog_fd, frame, runs))
        finally:
            os.close(stats)
            loaded.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    print(f"ns per SYN inside the XDP program ({args.runs} runs x {args.repetitions}): median (min-max)")
    for kind, values in measure(args.runs, args.repetitions).items():
        print(f"  {kind:40} {statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    main()
