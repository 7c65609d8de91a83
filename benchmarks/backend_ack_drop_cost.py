"""What a forged ACK beyond the reset budget costs the backend's programs, each on its own
(`python3 -m benchmarks.backend_ack_drop_cost`, root; run it from each checkout to compare).

The XDP stage (bpf/backend_xdp.bpf.c) and the tc program (bpf/backend.bpf.c), loaded as the loader loads
them with a budget of 0, each run on the same encapsulated forged ACK (unflagged, an authentic MAC, to a
VIP and port where only a listener waits) with BPF_PROG_TEST_RUN, one run per call, in a namespace of its
own holding the listener; run_time_ns / run_cnt with BPF_ENABLE_STATS on, as benchmarks/front_xdp_cost.py
measures the front. The stage's verdict says whether the tc program would still meet the packet.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import statistics

from benchmarks.front_xdp_cost import per_run
from synproxy import encap, netns
from synproxy.backend.loader import DataPlane, XdpStage
from synproxy.bpf.libbpf import enable_run_time_stats, prog_test_run
from synproxy.bpf.loading import build_object
from synproxy.packet import ACK, build_tcp_packet, parse_tcp
from synproxy.salt import SaltSchedule

VIP, CLIENT, FRONT, BACKEND = "198.19.0.10", "198.18.1.2", "198.18.10.2", "198.18.20.2"
PORT, ENCAP_PORT, SECRET = 80, 6080, bytes(range(32))
ETHERNET = bytes(12) + b"\x08\x00"
XDP_VERDICTS = {1: "XDP_DROP", 2: "XDP_PASS"}


def forged_ack() -> bytes:
    """The frame a front sends for a forged ACK it cannot tell from established traffic."""
    inner = build_tcp_packet(ipaddress.ip_address(CLIENT).packed, ipaddress.ip_address(VIP).packed, 4000, PORT,
                             7, 9, ACK, 512)
    return ETHERNET + encap.encapsulate(inner, parse_tcp(inner), ipaddress.ip_address(FRONT).packed,
                                        ipaddress.ip_address(BACKEND).packed, ENCAP_PORT, 0, False,
                                        encap.encap_key(SECRET))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000, help="runs per program and repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    plane = DataPlane(build_object("backend"))
    stage = XdpStage(plane)
    name = netns.unique_name("spad")
    results: dict[str, list[float]] = {"xdp stage": [], "tc program": []}
    stats = enable_run_time_stats()
    try:
        plane.configure(ENCAP_PORT, 7, 0)
        plane.trust([ipaddress.ip_address(FRONT)])
        plane.protect([ipaddress.ip_address(VIP)], [PORT])
        plane.refresh_encap_keys(SaltSchedule((SECRET,)))
        frame = forged_ack()
        with netns.namespaces(name), contextlib.ExitStack() as held:
            netns.run(name, ["ip", "link", "set", "lo", "up"])
            netns.add_addresses(name, "lo", f"{VIP}/32")
            with netns.inside(name):
                held.enter_context(socket.create_server((VIP, PORT)))
                verdict = XDP_VERDICTS.get(prog_test_run(stage.prog_fd, frame)[0], "other")
            for _ in range(args.repetitions):
                results["xdp stage"].append(per_run(name, stage.prog_fd, frame, args.runs))
                results["tc program"].append(per_run(name, plane.prog_fd, frame, args.runs))
    finally:
        os.close(stats)
        stage.close()
        plane.close()
    print(f"ns per forged ACK beyond the reset budget ({args.runs} runs x {args.repetitions}): median (min-max); "
          f"the stage's verdict: {verdict}")
    for program, values in results.items():
        print(f"  {program:12} {statistics.median(values):5.0f} ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    main()
