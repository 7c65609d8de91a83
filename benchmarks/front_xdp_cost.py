"""The front's XDP (or tc) program's own cost per packet, by kind of packet (`python3 -m benchmarks.front_xdp_cost
[--program tc]`, root).

Each packet is run through the program with BPF_PROG_TEST_RUN, one run per call (a repeated run would
see the frame the previous run rewrote), with the kernel's run-time statistics on (BPF_ENABLE_STATS):
run_time_ns / run_cnt is the time inside the program only, the figure the issue's targets name. In a
namespace of its own, with a route to the backends through a gateway whose neighbour is permanent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import statistics
import subprocess
import time

from synproxy import netns
from synproxy.bpf.libbpf import BpfObject, enable_run_time_stats, prog_test_run, program_id
from synproxy.bpf.loading import build_object
from synproxy.front.fastpath import FastPath
from synproxy.front.handler import FrontPolicy, handle
from synproxy.packet import ACK, FIN, PSH, SYN, build_tcp_options, build_tcp_packet, parse_tcp
from synproxy.salt import SaltSchedule

VIP, CLIENT, PORT = "198.19.0.10", "198.18.1.2", 80
ETHERNET = bytes(12) + b"\x08\x00"
RUN_SECONDS = 5
# What the method itself costs: bpf/xdp_pass.bpf.c, which only returns XDP_PASS, measured the same way.
FLOOR = "floor (a program that only passes)"
# What any forwarder of the front's shape costs here: bpf/xdp_min_forward.bpf.c parses, looks one target up,
# grows the head and writes the encapsulation's headers (no hash, no MAC, no cookie), on the 100-byte segment.
ANCHOR = "anchor: a minimal forwarder (no hash, no MAC)"
ANCHOR_PACKET = "forwarded_bad_mac (established, 100 B)"
# The same segment from a new client address and port each packet, as an ACK flood's are: the program's
# per-flow state (bpf/front.bpf.c, flow_of) never holds the flow, each computes its own hashes.
NEW_FLOWS = "forwarded_bad_mac (established, 100 B, a new flow each packet)"
NEW_FLOW_COUNT = 4096
# The SYN again, with front.syn_reply: ingress (no route lookup back to the client).
SYN_TO_SENDER = "syn_answered (syn_reply: ingress)"


def packets(policy: FrontPolicy, schedule: SaltSchedule, now: float) -> dict[str, bytes]:
    """One frame of each kind, the handshake ACK carrying the cookie the handler minted."""
    vip, client = ipaddress.ip_address(VIP).packed, ipaddress.ip_address(CLIENT).packed
    options = build_tcp_options(1460, 7, True, (1000, 0))
    syn = build_tcp_packet(client, vip, 40000, PORT, 1000, 0, SYN, 64240, options)
    cookie = parse_tcp(handle(syn, now, schedule, policy).packet).seq
    timestamp = build_tcp_options(None, None, False, (1001, 2000))
    # Established traffic's ack numbers are the peer's sequence numbers: their cookie epoch bits name an
    # accepted epoch or not by chance. Both kinds, so the figures do not depend on the clock.
    # (A repetition's runs take well under RUN_SECONDS: the epochs stay accepted, or not, meanwhile.)
    current = schedule.current_epoch(now) % 4
    unaccepted = ({0, 1, 2, 3} - {epoch % 4 for moment in (now, now + RUN_SECONDS)
                                  for epoch in schedule.accepted_epochs(moment)}).pop()
    accepted, expired = ((bits << 8 | 0x5a5a5000) + 1 for bits in (current, unaccepted))
    return {
        "syn_answered": syn,
        "validated": build_tcp_packet(client, vip, 40000, PORT, 1001, cookie + 1, ACK, 502, timestamp),
        "forwarded_bad_mac (established, 100 B)": build_tcp_packet(client, vip, 40000, PORT, 5000, accepted,
                                                                   ACK | PSH, 502, timestamp, bytes(100)),
        "forwarded_bad_mac (established, 1400 B)": build_tcp_packet(client, vip, 40000, PORT, 5000, accepted,
                                                                    ACK | PSH, 502, timestamp, bytes(1400)),
        "forwarded_expired_epoch (established, 100 B)": build_tcp_packet(client, vip, 40000, PORT, 5000, expired,
                                                                         ACK | PSH, 502, timestamp, bytes(100)),
        "forwarded (FIN)": build_tcp_packet(client, vip, 40000, PORT, 5000, accepted, FIN | ACK, 502, timestamp),
        "not_protected": build_tcp_packet(client, vip, 40000, PORT + 1, 5000, 777, ACK, 502),
    }


def policy_and_schedule() -> tuple[FrontPolicy, SaltSchedule]:
    """A front protecting VIP:PORT with seven backends, fresh keys and secret."""
    policy = FrontPolicy(vips=frozenset({ipaddress.ip_address(VIP).packed}), ports=frozenset({PORT}),
                         farm_address=ipaddress.ip_address("10.99.0.1").packed,
                         backends=tuple(ipaddress.ip_address(f"10.98.0.{i}").packed for i in range(1, 8)),
                         encap_port=6080, encap_key=os.urandom(16), flow_key=os.urandom(16))
    return policy, SaltSchedule((os.urandom(32),), period=60, skew=2)


@contextlib.contextmanager
def cost_namespace():
    """A namespace whose routes lead to the backends through a gateway with a permanent neighbour, and
    run-time statistics on while it lasts."""
    name = netns.unique_name("xc")
    with netns.namespaces(name):
        netns.link(name, "xca", name, "xcb")
        netns.add_addresses(name, "xca", "10.99.0.1/24")
        netns.run(name, ["ip", "neigh", "replace", "10.99.0.2", "lladdr", "02:00:00:00:99:02", "dev", "xca", "nud",
                         "permanent"])
        netns.add_route(name, "0.0.0.0/0", "10.99.0.2")
        netns.write_sysctls(name, {"net.ipv4.ip_forward": "1"})
        stats = enable_run_time_stats()
        try:
            yield name
        finally:
            os.close(stats)


def measure(object_path, runs: int, repetitions: int, program: str = "xdp") -> dict[str, list[float]]:
    """ns per run inside the object's XDP or tc program, by kind of packet, one figure per repetition (and
    the floor's, for XDP)."""
    policy, schedule = policy_and_schedule()
    results: dict[str, list[float]] = {}
    with cost_namespace() as name:
        loaded, to_sender = FastPath(object_path), FastPath(object_path)
        floor = BpfObject(build_object("xdp_pass"))
        anchor = BpfObject(build_object("xdp_min_forward"))
        try:
            anchor.map("min_forward_target").update(bytes(4), _anchor_target(policy))
            with netns.inside(name):  # the route back proved from the routing the runs look routes up in
                loaded.watch_routes_back()
            loaded.configure(policy, schedule)
            to_sender.configure(dataclasses.replace(policy, syn_reply="ingress"), schedule)
            for _ in range(repetitions):
                if program == "xdp":
                    results.setdefault(FLOOR, []).append(per_run(name, floor.program_fd("xdp_pass"), ETHERNET, runs))
                kinds = packets(policy, schedule, time.time())
                if program == "xdp":
                    results.setdefault(ANCHOR, []).append(
                        per_run(name, anchor.program_fd("xdp_min_forward"), ETHERNET + kinds[ANCHOR_PACKET], runs))
                for kind, packet in kinds.items():
                    results.setdefault(kind, []).append(_measured(name, loaded, program, kind, packet, runs))
                results.setdefault(SYN_TO_SENDER, []).append(
                    _measured(name, to_sender, program, SYN_TO_SENDER, kinds["syn_answered"], runs))
                results.setdefault(NEW_FLOWS, []).append(
                    _measured(name, loaded, program, NEW_FLOWS, new_flows(kinds[ANCHOR_PACKET]), runs))
        finally:
            floor.close()
            anchor.close()
            loaded.close()
            to_sender.close()
    return results


def _anchor_target(policy: FrontPolicy) -> bytes:
    """The anchor's one target (struct min_forward_target): the policy's farm address and first backend,
    the gateway's MAC as the benchmarks' namespace has it."""
    return (policy.farm_address + policy.backends[0] + policy.encap_port.to_bytes(2, "big") + b"\xc0\x01"
            + bytes.fromhex("020000009902") + bytes(6))


def new_flows(packet: bytes) -> list[bytes]:
    """`packet` (IPv4) from NEW_FLOW_COUNT random client addresses and ports, checksums made again."""
    segment = parse_tcp(packet)
    payload = packet[len(packet) - segment.payload_length:]
    return [build_tcp_packet(b"\xc6\x12" + os.urandom(2), segment.daddr, 1024 + i, segment.dport, segment.seq,
                             segment.ack, segment.flags, segment.window, segment.raw_options, payload)
            for i in range(NEW_FLOW_COUNT)]


def _measured(namespace: str, loaded: FastPath, program: str, kind: str, packet: bytes | list[bytes],
              runs: int) -> float:
    """per_run of one kind of packet (or of packets, in turn), once the program has counted it as that kind."""
    prog_fd = loaded.xdp_prog_fd if program == "xdp" else loaded.prog_fd
    packets_ = packet if isinstance(packet, list) else [packet]
    counted = loaded.counts(program)
    with netns.inside(namespace):
        prog_test_run(prog_fd, ETHERNET + packets_[0])
    moved = {key[0] for key, value in loaded.counts(program).items() if value != counted[key]}
    if moved != {kind.split()[0]}:
        raise SystemExit(f"{kind}: the program counted {moved}")
    return per_run(namespace, prog_fd, [ETHERNET + one for one in packets_], runs)


def per_run(namespace: str, prog_fd: int, frame: bytes | list[bytes], runs: int) -> float:
    """ns per run inside the program: `runs` runs of `frame` (or of the frames, in turn)."""
    frames = frame if isinstance(frame, list) else [frame]
    prog = program_id(prog_fd)
    before = _run_stats(prog)
    with netns.inside(namespace):
        for run in range(runs):
            prog_test_run(prog_fd, frames[run % len(frames)])
    after = _run_stats(prog)
    return (after[0] - before[0]) / (after[1] - before[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000, help="runs per kind and repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--program", choices=("xdp", "tc"), default="xdp")
    args = parser.parse_args()
    results = measure(build_object("front"), args.runs, args.repetitions, args.program)
    print(f"ns per packet inside the {args.program} program ({args.runs} runs x {args.repetitions}): median (min-max)")
    for kind, values in results.items():
        print(f"  {kind:46} {statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})")


def _run_stats(prog: int) -> tuple[int, int]:
    shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog)], check=True,
                                      capture_output=True, text=True).stdout)
    return shown.get("run_time_ns", 0), shown.get("run_cnt", 0)  # absent until the first run


if __name__ == "__main__":
    main()
