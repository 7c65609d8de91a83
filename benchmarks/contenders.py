"""The contenders, each set up on the same one-front lab and taken down again to its baseline.

Baseline: the router sends the VIP to front0, front0 blackholes what it does not rewrite, backend0
runs the BPF data plane and its servers, and no front process runs. Each contender's `enter` builds
its deployment from there and `leave` restores it.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from pyroute2 import NetNS

from synproxy.lab.topology import SPOOFED_SOURCES, VIP, Lab

FRONT, BACKEND = "front0", "backend0"
PORT = 80  # flooded, protected and probed: the HTTP server's port
QUEUE = 0  # the default front.queue_num
SYNPROXY_TABLE = 100   # router: VIP traffic coming back from front0 goes on to the backend
RETURN_TABLE = 101     # router: the backend's answers go back through front0 (SYNPROXY is not DSR)


def nft(lab: Lab, host: str, script: str) -> None:
    lab.run(host, ["nft", "-f", "-"], input=script)


class Contender:
    name = ""
    description = ""
    serves_clients = True   # legitimate clients can connect through it (the probe runs for all alike)
    answers = "SYN-ACKs"     # what its answered count is
    scenarios = ("syn", "ack", "mixed", "upload")  # the ones it takes part in (harness.SCENARIOS)
    # Measured only at the highest rate: what a floor costs per packet is read where its CPU is busy
    # (paced steps read the idle CPU's wake-ups more than the work: benchmarks/README.md, Method).
    top_rate_only = False

    def enter(self, lab: Lab) -> None:
        pass

    def leave(self, lab: Lab) -> None:
        pass

    def pid(self, lab: Lab) -> int | None:
        """The user-space process doing the work, if there is one (its own CPU time is reported)."""
        return None

    def running(self, lab: Lab) -> dict:
        """What the contender says it runs, where it can say (the front: its data plane)."""
        return {}


class Sink(Contender):
    name = "sink"
    description = "spoofed SYNs dropped at front0's first netfilter hook: the generator's capacity and cost"
    serves_clients = False
    answers = "packets dropped"
    scenarios = ("syn",)
    top_rate_only = True

    def enter(self, lab: Lab) -> None:
        nft(lab, FRONT, "table inet synproxy_bench_sink {\n chain prerouting {\n"
                        "  type filter hook prerouting priority -350; policy accept;\n"
                        f"  ip saddr {SPOOFED_SOURCES} drop\n }}\n}}\n")

    def leave(self, lab: Lab) -> None:
        lab.run(FRONT, ["nft", "delete", "table", "inet", "synproxy_bench_sink"])


class NfqueueFloor(Contender):
    name = "nfqueue-floor"
    description = "the front's rules and NFQUEUE binding, reading and dropping every packet (Python)"
    serves_clients = False
    answers = "packets read"
    scenarios = ("syn",)
    top_rate_only = True

    floor_args: tuple[str, ...] = ()

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def enter(self, lab: Lab) -> None:
        self.process = lab.popen(FRONT, [sys.executable, "-m", "benchmarks.nfqueue_floor", "--queue", str(QUEUE),
                                         "--vip", VIP, "--port", str(PORT), *self.floor_args],
                                 stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.wait(timeout=10)
            raise RuntimeError("the NFQUEUE floor consumer did not start")

    def leave(self, lab: Lab) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
            self.process = None

    def pid(self, lab: Lab) -> int | None:
        return self.process.pid if self.process else None


class NfqueueAnswerFloor(NfqueueFloor):
    name = "nfqueue-answer-floor"
    description = ("the same, sending every packet back with its addresses swapped: the least an answer "
                   "through NFQUEUE costs (a verdict with a payload, then forwarding), no parsing, no cookie")
    floor_args = ("--answer",)


class Front(Contender):
    name = "synproxy-front"
    description = ("this project as users get it: `synproxy front` on front0 with the default "
                   "`front.data_plane: auto` (native XDP here: every packet to the VIP in the kernel), BPF "
                   "backend, direct server return")
    data_plane: str | None = None  # None: the lab's, auto

    def enter(self, lab: Lab) -> None:
        lab.start_front(FRONT, data_plane=self.data_plane)

    def leave(self, lab: Lab) -> None:
        lab.stop_process(FRONT)

    def pid(self, lab: Lab) -> int | None:
        return lab.pid(FRONT)

    def running(self, lab: Lab) -> dict:
        """The data plane the front says it selected (its metrics): a contender is what it ran, not what
        it was asked for."""
        return lab.data_plane_of(lab_host(lab, FRONT))


class FrontTc(Front):
    name = "synproxy-front-tc"
    description = ("the same with `front.data_plane: tc`: the tc program (bpf/front.bpf.c) takes every packet "
                   "to the VIP as the XDP program does, after the kernel has built its skb")
    data_plane = "tc"


class FrontNfqueue(Front):
    name = "synproxy-front-nfqueue"
    description = "the same with `front.data_plane: nfqueue`: the Python handler on NFQUEUE gets every packet"
    data_plane = "nfqueue"


class PlainBackend(Contender):
    """A kernel contender: the backend is a plain server (the BPF data plane detached)."""

    def enter(self, lab: Lab) -> None:
        lab.stop_process(BACKEND)

    def leave(self, lab: Lab) -> None:
        lab.start_backend(BACKEND)


class KernelSyncookies(PlainBackend):
    name = "kernel-syncookies"
    description = "no proxy: the router sends the VIP to the backend, whose listener answers with " \
                  "tcp_syncookies=2 (for the upload: the bypass, the fronts left out)"

    def enter(self, lab: Lab) -> None:
        super().enter(lab)
        lab.sysctl(BACKEND, {"net.ipv4.tcp_syncookies": "2"})
        with NetNS(lab.ns("router")) as ns:
            ns.route("replace", dst=f"{VIP}/32", gateway=lab_host(lab, BACKEND).address)

    def leave(self, lab: Lab) -> None:
        with NetNS(lab.ns("router")) as ns:
            ns.route("replace", dst=f"{VIP}/32", multipath=[{"gateway": lab_host(lab, FRONT).address}])
        lab.sysctl(BACKEND, {"net.ipv4.tcp_syncookies": "1"})
        super().leave(lab)


IPTABLES_SYNPROXY = [  # the standard recipe (iptables-extensions(8), SYNPROXY), for forwarded traffic
    ["-t", "raw", "PREROUTING", "-d", VIP, "-p", "tcp", "--dport", str(PORT), "--syn", "-j", "CT", "--notrack"],
    ["FORWARD", "-d", VIP, "-p", "tcp", "--dport", str(PORT), "-m", "conntrack", "--ctstate", "INVALID,UNTRACKED",
     "-j", "SYNPROXY", "--sack-perm", "--timestamp", "--wscale", "7", "--mss", "1460"],
    ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
]


def _iptables(lab: Lab, verb: str, rule: list[str]) -> None:
    table, rest = (rule[:2], rule[2:]) if rule[0] == "-t" else ([], rule)
    lab.run(FRONT, ["iptables", "-w", *table, verb, *rest])


class IptablesSynproxy(PlainBackend):
    name = "iptables-synproxy"
    description = "iptables SYNPROXY on front0 (conntrack, sequence translation); answers return through it"

    def enter(self, lab: Lab) -> None:
        super().enter(lab)
        backend, front = lab_host(lab, BACKEND), lab_host(lab, FRONT)
        with NetNS(lab.ns(FRONT)) as ns:
            ns.route("del", dst=f"{VIP}/32", type="blackhole")
        with NetNS(lab.ns("router")) as ns:
            ns.route("add", dst=f"{VIP}/32", gateway=backend.address, table=SYNPROXY_TABLE)
            ns.rule("add", iifname=FRONT, table=SYNPROXY_TABLE, priority=SYNPROXY_TABLE)
            ns.route("add", dst="0.0.0.0/0", gateway=front.address, table=RETURN_TABLE)
            ns.rule("add", iifname=BACKEND, src=VIP, src_len=32, table=RETURN_TABLE, priority=RETURN_TABLE)
        for rule in IPTABLES_SYNPROXY:
            _iptables(lab, "-A", rule)
        lab.sysctl(FRONT, {"net.ipv4.ip_forward": "1", "net.netfilter.nf_conntrack_tcp_loose": "0"})

    def leave(self, lab: Lab) -> None:
        for rule in IPTABLES_SYNPROXY:
            _iptables(lab, "-D", rule)
        lab.sysctl(FRONT, {"net.netfilter.nf_conntrack_tcp_loose": "1"})
        backend, front = lab_host(lab, BACKEND), lab_host(lab, FRONT)
        with NetNS(lab.ns("router")) as ns:
            ns.rule("del", iifname=BACKEND, src=VIP, src_len=32, table=RETURN_TABLE, priority=RETURN_TABLE)
            ns.route("del", dst="0.0.0.0/0", gateway=front.address, table=RETURN_TABLE)
            ns.rule("del", iifname=FRONT, table=SYNPROXY_TABLE, priority=SYNPROXY_TABLE)
            ns.route("del", dst=f"{VIP}/32", gateway=backend.address, table=SYNPROXY_TABLE)
        with NetNS(lab.ns(FRONT)) as ns:
            ns.route("add", dst=f"{VIP}/32", type="blackhole")
        super().leave(lab)


def lab_host(lab: Lab, name: str):
    return next(host for host in lab.hosts if host.name == name)


ALL = (Sink, NfqueueFloor, NfqueueAnswerFloor, Front, FrontTc, FrontNfqueue, KernelSyncookies, IptablesSynproxy)
