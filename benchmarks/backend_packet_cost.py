"""What the backend's programs cost per packet, each on its own, by kind of packet
(`python3 -m benchmarks.backend_packet_cost`, root; run it from each checkout to compare).

The XDP stage (bpf/backend_xdp.bpf.c) and the tc program (bpf/backend.bpf.c), loaded as the loader loads
them, run with BPF_PROG_TEST_RUN, one run per call, in a namespace of its own holding a listener on the
VIP and port and a connection to it, on encapsulated unflagged segments with an authentic MAC: a forged
ACK (only the listener) with a reset budget of 0, and the connection's bare ACK and 1 KiB data segment
(what an HTTP client sends) with the default budget and with none (an ACK flood has spent it). For each: the stage's own time, the tc program's on
what the stage passes (plain TCP once stripped, or the packet untouched) and the tc program's alone on
the encapsulated packet (a backend without the stage); run_time_ns / run_cnt with BPF_ENABLE_STATS on,
as benchmarks/front_xdp_cost.py measures the front.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics

from benchmarks.front_xdp_cost import per_run
from synproxy import encap, netns
from synproxy.backend.loader import DataPlane, XdpStage
from synproxy.bpf.libbpf import enable_run_time_stats, prog_test_run
from synproxy.bpf.loading import build_object
from synproxy.config import UNKNOWN_FLOW_RESETS_PER_SECOND
from synproxy.packet import ACK, PSH, build_tcp_packet, parse_tcp
from synproxy.salt import SaltSchedule

VIP, CLIENT, FRONT, BACKEND = "198.19.0.10", "198.18.1.2", "198.18.10.2", "198.18.20.2"
PORT, ENCAP_PORT, SECRET = 80, 6080, bytes(range(32))
ETHERNET = bytes(12) + b"\x08\x00"
XDP_VERDICTS = {1: "drop", 2: "pass"}


def encapsulated(sport: int, flags: int, payload: bytes = b"") -> bytes:
    """The frame a front sends for a segment it cannot tell from established traffic."""
    inner = build_tcp_packet(ipaddress.ip_address(CLIENT).packed, ipaddress.ip_address(VIP).packed, sport, PORT,
                             7, 9, flags, 512, payload=payload)
    return ETHERNET + encap.encapsulate(inner, parse_tcp(inner), ipaddress.ip_address(FRONT).packed,
                                        ipaddress.ip_address(BACKEND).packed, ENCAP_PORT, 0, False,
                                        encap.encap_key(SECRET))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000, help="runs per program, kind and repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    plane = DataPlane(build_object("backend"))
    stage = XdpStage(plane)
    results: dict[tuple[str, str], list[float]] = {}
    verdicts = {}
    stats = enable_run_time_stats()
    try:
        plane.trust([ipaddress.ip_address(FRONT)])
        plane.protect([ipaddress.ip_address(VIP)], [PORT])
        plane.refresh_encap_keys(SaltSchedule((SECRET,)))
        with netns.connections_on_loopback("spad", PORT, (VIP, CLIENT)) as (name, ports):
            sport = ports[CLIENT]
            connection = {"bare ACK": encapsulated(sport, ACK),
                          "1 KiB segment": encapsulated(sport, ACK | PSH, bytes(1024))}
            kinds = {"forged ACK, no budget": (0, encapsulated(sport + 1, ACK)),
                     **{f"a connection's {what}": (UNKNOWN_FLOW_RESETS_PER_SECOND, frame)
                        for what, frame in connection.items()},
                     **{f"a connection's {what}, no budget": (0, frame) for what, frame in connection.items()}}
            passed = {}
            for kind, (budget, frame) in kinds.items():
                plane.configure(ENCAP_PORT, 7, budget)
                verdict, out = prog_test_run(stage.prog_fd, frame)
                verdicts[kind] = XDP_VERDICTS.get(verdict, "other") + (", stripped" if verdict == 2 and
                                                                        out != frame else "")
                passed[kind] = out if verdict == 2 else None
            for _ in range(args.repetitions):
                for kind, (budget, frame) in kinds.items():
                    plane.configure(ENCAP_PORT, 7, budget)
                    results.setdefault((kind, "stage"), []).append(per_run(name, stage.prog_fd, frame, args.runs))
                    if passed[kind] is not None:
                        results.setdefault((kind, "tc after it"), []).append(
                            per_run(name, plane.prog_fd, passed[kind], args.runs))
                    results.setdefault((kind, "tc alone"), []).append(per_run(name, plane.prog_fd, frame, args.runs))
    finally:
        os.close(stats)
        stage.close()
        plane.close()
    print(f"ns per packet ({args.runs} runs x {args.repetitions}): median (min-max); the stage's verdict in brackets")
    for kind in kinds:
        print(f"  {kind} [{verdicts[kind]}]")
        for (of_kind, program), values in results.items():
            if of_kind == kind:
                print(f"    {program:12} {statistics.median(values):5.0f} ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    main()
