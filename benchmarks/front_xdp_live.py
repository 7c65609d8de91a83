"""The front's XDP program's own cost in traffic, next to the floor and the anchor (`python3 -m
benchmarks.front_xdp_live`, root).

benchmarks/front_xdp_cost.py runs each packet by BPF_PROG_TEST_RUN, with caches cooler than traffic
leaves them. Here each program is attached natively to a veth in a namespace of its own and a packet
socket on the peer sends it a bounded number of frames (the program runs in the sender's softirq, as a
veth delivers); run_time_ns / run_cnt (kernel.bpf_stats) is read around each batch. The peer has an XDP
program of its own, so what the program sends back (XDP_TX) is delivered, as in the lab.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import statistics
import time

from benchmarks.front_xdp_cost import (
    ANCHOR,
    ANCHOR_PACKET,
    FLOOR,
    NEW_FLOWS,
    _anchor_target,
    _run_stats,
    new_flows,
    packets,
    policy_and_schedule,
)
from synproxy import netns
from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    BpfObject,
    enable_run_time_stats,
    program_id,
    xdp_attach,
    xdp_detach,
)
from synproxy.bpf.loading import build_object
from synproxy.front.fastpath import FastPath

SENDER, FRONT = "xla", "xlb"
SEND_SECONDS = 10  # the most one batch may take
FRONT_KINDS = ("forwarded (FIN)", ANCHOR_PACKET, NEW_FLOWS)


def mac_of(namespace: str, ifname: str) -> bytes:
    shown = json.loads(netns.run(namespace, ["ip", "-j", "link", "show", ifname]).stdout)
    return bytes.fromhex(shown[0]["address"].replace(":", ""))


@contextlib.contextmanager
def live_pair():
    """A sender namespace and a front namespace joined by a veth; the front's backends routed back out of
    its veth through the sender (a permanent neighbour), so a forwarded packet leaves by XDP_TX."""
    sender, front = netns.unique_name("xls"), netns.unique_name("xlf")
    with netns.namespaces(sender, front):
        netns.link(sender, SENDER, front, FRONT)
        netns.add_addresses(front, FRONT, "10.99.0.1/24")
        netns.add_addresses(sender, SENDER, "10.99.0.2/24")
        sender_mac = mac_of(sender, SENDER)
        netns.run(front, ["ip", "neigh", "replace", "10.99.0.2", "lladdr", sender_mac.hex(":"), "dev", FRONT,
                          "nud", "permanent"])
        netns.add_route(front, "0.0.0.0/0", "10.99.0.2")
        netns.write_sysctls(front, {"net.ipv4.ip_forward": "1"})
        stats = enable_run_time_stats()
        try:
            yield sender, front, sender_mac, mac_of(front, FRONT)
        finally:
            os.close(stats)


@contextlib.contextmanager
def attached(namespace: str, ifname: str, prog_fd: int):
    with netns.inside(namespace):
        ifindex = socket.if_nametoindex(ifname)
        xdp_attach(ifindex, prog_fd, XDP_FLAGS_DRV_MODE)
    try:
        yield
    finally:
        with netns.inside(namespace):
            xdp_detach(ifindex, XDP_FLAGS_DRV_MODE, prog_fd)


def send(sender: str, frames: list[bytes], count: int) -> int:
    """`count` frames (the list in turn) out of the sender's veth, within SEND_SECONDS: how many were sent."""
    with netns.inside(sender):
        out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with out:
        out.bind((SENDER, 0))
        deadline = time.monotonic() + SEND_SECONDS
        for sent in range(count):
            if sent % 1024 == 0 and time.monotonic() > deadline:
                return sent
            while True:
                try:
                    out.send(frames[sent % len(frames)])
                    break
                except OSError as error:  # the peer's ring is full (ENOBUFS): let its NAPI run
                    if error.errno != errno.ENOBUFS or time.monotonic() > deadline:
                        raise
                    time.sleep(0.0001)
    return count


def batch(sender: str, prog_fd: int, frames: list[bytes], count: int) -> tuple[float, float]:
    """ns per run of the program over one batch, and the share of the frames sent that it ran on."""
    prog = program_id(prog_fd)
    before = _run_stats(prog)
    sent = send(sender, frames, count)
    after = _run_stats(prog)
    runs = after[1] - before[1]
    return (after[0] - before[0]) / runs if runs else float("nan"), runs / sent


def measure(count: int, repetitions: int) -> dict[str, list[tuple[float, float]]]:
    policy, schedule = policy_and_schedule()
    results: dict[str, list[tuple[float, float]]] = {}
    with live_pair() as (sender, front, sender_mac, front_mac):
        ethernet = front_mac + sender_mac + b"\x08\x00"
        floor, returns = BpfObject(build_object("xdp_pass")), BpfObject(build_object("xdp_pass"))
        anchor = BpfObject(build_object("xdp_min_forward"))
        loaded = FastPath(build_object("front"))
        try:
            anchor.map("min_forward_target").update(bytes(4), _anchor_target(policy)[:-12] + sender_mac + front_mac)
            loaded.configure(policy, schedule)
            programs = {FLOOR: floor.program_fd("xdp_pass"), ANCHOR: anchor.program_fd("xdp_min_forward"),
                        "front": loaded.xdp_prog_fd}
            with attached(sender, SENDER, returns.program_fd("xdp_pass")):  # delivers what comes back by XDP_TX
                for _ in range(repetitions):
                    kinds = packets(policy, schedule, time.time())
                    kinds[NEW_FLOWS] = new_flows(kinds[ANCHOR_PACKET])
                    for name, prog_fd in programs.items():
                        with attached(front, FRONT, prog_fd):
                            for kind in FRONT_KINDS if name == "front" else (ANCHOR_PACKET,):
                                packets_ = kinds[kind] if isinstance(kinds[kind], list) else [kinds[kind]]
                                label = kind if name == "front" else name
                                counted = loaded.counts("xdp")
                                results.setdefault(label, []).append(
                                    batch(sender, prog_fd, [ethernet + one for one in packets_], count))
                                moved = {key[0] for key, value in loaded.counts("xdp").items() if value != counted[key]}
                                if moved != ({kind.split()[0]} if name == "front" else set()):
                                    raise SystemExit(f"{label}: the front counted {moved}")
        finally:
            loaded.close()
            anchor.close()
            floor.close()
            returns.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=50000, help="frames per program, kind and repetition")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    results = measure(args.packets, args.repetitions)
    print(f"ns per packet inside the attached XDP program, in traffic ({args.packets} frames x {args.repetitions}): "
          "median (min-max), share of the frames it ran on")
    for kind, values in results.items():
        ns = [value for value, _ in values]
        print(f"  {kind:46} {statistics.median(ns):7.0f} ({min(ns):.0f}-{max(ns):.0f})  ran on "
              f"{min(share for _, share in values):.3f}-{max(share for _, share in values):.3f}")


if __name__ == "__main__":
    main()
