"""`synproxy front`: the NFQUEUE shell around the sans-IO handler, and the loader of the kernel data plane
(front.data_plane: the BPF programs of synproxy/front/fastpath.py handle what they can before the queue).

It installs its packet-filter rules, binds the queue, gives every packet one verdict (the SYN-ACK or
the encapsulated packet replaces the payload; everything else is dropped), serves its metrics, and
removes its rules on exit. SIGHUP reloads the configuration and the secrets. With front.bgp it announces
the VIPs to its routers while it is ready (/readyz); SIGUSR1 drains it (withdraws, keeps answering what
still arrives), SIGUSR2 ends the drain, and SIGTERM withdraws, answers for front.bgp.stop_wait_seconds
while the routers move the traffic, then stops. Whatever happens while
handling a packet, the packet gets a verdict (a drop, counted by reason) and the loop goes on: one
packet must not stop a front.

With ``front.workers`` above 1 the process supervises one forked worker per queue (Python runs one
thread at a time, so cores need processes): each worker runs the same packet loop on its own queue and
reports its counts; the parent owns the rules, the programs, the metrics and health endpoints, the BGP
announcer, the drain, the stop wait and the reloads, forwards SIGHUP, and restarts a worker that dies
(it is not ready meanwhile). Workers die with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from netfilterqueue import NetfilterQueue
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from synproxy import firewall, health, instance
from synproxy.config import PREVIOUS_TABLE_SECONDS, Config, ConfigError, load_config, log_warnings
from synproxy.encap import encap_key
from synproxy.front import fastpath
from synproxy.front.announce import Announcer
from synproxy.front.handler import (
    FASTOPEN_COOKIE_ISSUED,
    FASTOPEN_FALLBACKS,
    ICMP_ERRORS_BURST,
    ICMP_ERRORS_PER_SECOND,
    ICMP_FORWARDED,
    TOO_BIG,
    Action,
    FastOpenLimit,
    FrontPolicy,
    TokenBucket,
    handle,
)
from synproxy.logs import log
from synproxy.maglev import PreviousOwners
from synproxy.netlink import default_gateways, default_route_interfaces, local_addresses
from synproxy.salt import SaltSchedule, SecretRotation
from synproxy.systemd import Notifier

QUEUE_MAX_LENGTH = 8192
# The netlink socket must hold a full queue: netfilterqueue sizes it for its default of 1024
# packets, and with that the kernel dropped a third of a 10k SYN/s flood (user_dropped) while
# this process was 65 % idle, every scheduling hiccup overflowing it. ~830 bytes of truesize per
# queued SYN; 2 KiB a packet leaves room for full-size ones.
SOCKET_BUFFER_BYTES = QUEUE_MAX_LENGTH * 2048
NFQUEUE_STATS = Path("/proc/net/netfilter/nfnetlink_queue")
# Timing every packet into a histogram would cost as much as handling it: time one in 16.
TIMING_SAMPLE_MASK = 15
PROCESSING_BUCKETS = (2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)  # seconds
HOUSEKEEPING_SECONDS = 0.5  # how often the loop handles signals, salt epochs and secret expiry
# Workers: each sends its counts this often (a scrape waits for a report newer than itself, so its
# totals hold every verdict given before it, at most this much later); a worker that dies is restarted
# at most once per RESTART_SECONDS (one failing at start would otherwise be forked in a tight loop).
WORKER_REPORT_SECONDS = 0.1
SCRAPE_WAIT_SECONDS = 1.0  # a stopped worker (SIGSTOP) delays a scrape this long, then its last counts serve
WORKER_START_SECONDS = 10.0
WORKER_STOP_SECONDS = 5.0
RESTART_SECONDS = 1.0
# A worker that has not reported for this long (stopped, stuck) makes its front not ready: its queue's
# packets wait unanswered.
WORKER_SILENT_SECONDS = 2.0
PR_SET_PDEATHSIG = 1
# Forwarding for the rewritten packets; accept_local because an encapsulated packet leaves with this
# node's own address as source, which the kernel otherwise drops as a martian when it routes it.
FRONT_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1"}
IPV6_FRONT_SYSCTLS = {"net.ipv6.conf.all.forwarding": "1"}  # only with an IPv6 VIP
# ICMP "too big" answers: a router's rate (Linux's icmp_ratelimit is ~1 per second per destination; a
# front answers many clients), so a flood of big packets gets small answers only, and few.
TOO_BIG_PER_SECOND, TOO_BIG_BURST = 100, 200
FAILURE_LOG_SECONDS = 10.0  # a packet that fails once fails as often as someone sends it: log each reason this often
# Under attack (SYNs answered faster than this, or the queue dropping) the front logs what it did every
# SUMMARY_SECONDS: the log then tells the story without a dashboard. Ordinary traffic logs nothing.
SUMMARY_SECONDS, ATTACK_SYNS_PER_SECOND = 10.0, 1000
# The outcomes counted per VIP and port too (synproxy_front_vip_packets_total), under the programs' names
# (fastpath.VIP_PORT_OUTCOMES): an ACK forwarded whatever its cookie said is "forwarded".
VIP_PORT_OUTCOME = {"syn_answered": "syn_answered", "validated": "validated", "forwarded": "forwarded",
                    "forwarded_bad_mac": "forwarded", "forwarded_expired_epoch": "forwarded"}
# What a reload cannot change in a running front: the queue it holds, its metrics socket, its programs.
RESTART_KEYS = ("front.queue_num", "front.metrics_address", "front.data_plane", "front.interfaces",
                "front.xdp_mode", "front.workers", "front.bgp")


def ensure_sysctls(config: Config) -> None:
    wanted = dict(FRONT_SYSCTLS)
    if any(vip.version == 6 for vip in config.vips):
        wanted.update(IPV6_FRONT_SYSCTLS)
    for key, value in wanted.items():
        path = Path("/proc/sys", *key.split("."))
        if path.read_text().strip() != value:
            try:
                path.write_text(value)
            except OSError as error:
                raise ConfigError(f"{key} must be {value} on a front and cannot be set here ({error.strerror}); "
                                  "set it beforehand (a container needs it in its sysctls)") from None
            log("sysctl_set", key=key, value=value)


def farm_address(config: Config):
    """The configured front address, or the one of `fronts` that is local to this node."""
    return config.farm_address_among(local_addresses())


def build_policy(config: Config, schedule: SaltSchedule, previous: PreviousOwners | None = None) -> FrontPolicy:
    """The handler's policy; encapsulations are MACed with the key of the secret that mints cookies. New
    connections go to the backends neither draining nor down; ``previous`` (the front's chain history)
    follows the new tables."""
    entries = config.backend_entries
    active = [entry for entry in entries if not entry.drain and not entry.down]
    policy = FrontPolicy(vips=frozenset(vip.packed for vip in config.vips), ports=frozenset(config.ports),
                         farm_address=farm_address(config).packed,
                         backends=tuple(entry.address.packed for entry in active), encap_port=config.encap_port,
                         encap_key=encap_key(schedule.secrets[0]), flow_key=config.flow_key(),
                         backend_mss=config.backend_mss, server_wscale=config.server_wscale,
                         sack=config.sack, ecn=config.ecn, timestamps=config.timestamps,
                         window_scaling=config.window_scaling,
                         farm_mtu=config.farm_mtu, syn_reply=config.front.syn_reply,
                         queue_packets_per_second=config.front.queue_packets_per_second,
                         weights=tuple(entry.weight for entry in active),
                         draining=tuple((entry.address.packed, entry.weight) for entry in entries if entry.drain),
                         down=frozenset(entry.address.packed for entry in entries if entry.down), previous=previous,
                         tfo_secret=schedule.secrets[0] if config.tfo.enabled else None,
                         tfo_key_period=config.tfo.key_period_seconds)
    if previous is not None:
        previous.window = config.front.previous_table_seconds
        previous.follow(policy.owner_table(), policy.draining_table(), policy.down, time.monotonic())
    return policy


def queue_stats(queue_num: int, text: str) -> dict[str, int] | None:
    """One queue's line of /proc/net/netfilter/nfnetlink_queue: its length, the kernel's drops, and the
    packet id last given out (packets queued since the queue was bound)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == str(queue_num):
            return {"length": int(fields[2]), "dropped": int(fields[5]), "user_dropped": int(fields[6]),
                    "id_sequence": int(fields[7])}
    return None


def bind_queue(queue_num: int, callback) -> NetfilterQueue:
    try:
        queue = NetfilterQueue()
        queue.bind(queue_num, callback, max_len=QUEUE_MAX_LENGTH, sock_len=SOCKET_BUFFER_BYTES)
    except OSError as error:
        # libnetfilter_queue says neither why nor with an errno: name the two causes seen here.
        cause = ("this needs root (CAP_NET_ADMIN)" if not instance.has_capability(instance.CAP_NET_ADMIN)
                 else "another program holds this queue")
        raise SystemExit(f"synproxy front: cannot bind NFQUEUE {queue_num}: {error} ({cause})") from None
    return queue


def destination(packet: bytes) -> tuple[bytes, int]:
    """A parsed TCP packet's destination address (packed) and port: where packet.parse_tcp found them
    (IPv4: the TCP header after the IHL; IPv6: no extension headers)."""
    if packet[0] >> 4 == 4:
        tcp = (packet[0] & 0x0F) * 4
        return packet[16:20], int.from_bytes(packet[tcp + 2:tcp + 4], "big")
    return packet[24:40], int.from_bytes(packet[42:44], "big")


def send_failure(error: OSError) -> str:
    """The outcome label of a failed send, by errno (e.g. send_failed_enetunreach)."""
    return f"send_failed_{errno.errorcode.get(error.errno, 'unknown').lower()}"


class FailureLog:
    """Logs a failed packet at most once per FAILURE_LOG_SECONDS for each outcome, with how many were not."""

    def __init__(self):
        self.logged_at: dict[str, float] = {}
        self.unlogged: defaultdict[str, int] = defaultdict(int)

    def note(self, outcome: str, error: BaseException, now: float) -> None:
        if now - self.logged_at.get(outcome, -FAILURE_LOG_SECONDS) < FAILURE_LOG_SECONDS:
            self.unlogged[outcome] += 1
            return
        self.logged_at[outcome] = now
        where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        log("packet_failed", outcome=outcome, error=f"{type(error).__name__}: {error}",
            where=f"{where.filename}:{where.lineno}" if where else None,
            not_logged_since=self.unlogged.pop(outcome, 0))


class AttackSummary:
    """Decides, from running totals (outcome -> packets, every path summed; "queue_dropped" too), when
    to log a summary: every SUMMARY_SECONDS while under attack, and once when it ends."""

    def __init__(self):
        self.previous: dict[str, int] | None = None
        self.since = 0.0
        self.under_attack = False

    def due(self, now: float) -> bool:
        return self.previous is None or now - self.since >= SUMMARY_SECONDS

    def update(self, totals: dict[str, int], now: float) -> dict | None:
        if self.previous is None:
            self.previous, self.since = dict(totals), now
            return None
        seconds = now - self.since
        delta = {key: value - self.previous.get(key, 0) for key, value in totals.items()}
        self.previous, self.since = dict(totals), now
        attacked = delta.get("syn_answered", 0) >= ATTACK_SYNS_PER_SECOND * seconds or delta.get("queue_dropped", 0) > 0
        was, self.under_attack = self.under_attack, attacked
        if not attacked and not was:
            return None
        return {"event": "under_attack" if attacked else "attack_ended", "seconds": round(seconds, 1),
                "per_second": {key: round(value / seconds, 1) for key, value in sorted(delta.items()) if value}}


class PacketCounts:
    """What a packet loop counted: plain integers the loop adds to (Front.on_packet), read at scrape time
    (a prometheus_client Counter or Histogram takes a lock on every increment). A worker sends its own to
    the parent, pickled."""

    def __init__(self):
        self.packets: defaultdict[tuple[str, int], int] = defaultdict(int)  # (outcome, IP version)
        self.fastopen: defaultdict[str, int] = defaultdict(int)  # TFO SYNs by Verdict.fastopen
        # By backend address, not position: a reload may add, remove or reorder backends.
        self.forwarded: defaultdict[str, int] = defaultdict(int)
        # (VIP's packed address, port, outcome) for the outcomes operators ask per service: bounded, since only
        # packets to a configured VIP and port get these outcomes.
        self.vip_ports: defaultdict[tuple[bytes, int, str], int] = defaultdict(int)
        self.timing = [0] * (len(PROCESSING_BUCKETS) + 1)  # sampled processing times per bucket, +Inf last
        self.timing_sum = 0.0

    def observe(self, seconds: float) -> None:
        self.timing[bisect.bisect_left(PROCESSING_BUCKETS, seconds)] += 1
        self.timing_sum += seconds

    def add(self, other: PacketCounts) -> None:
        for key, value in list(other.packets.items()):
            self.packets[key] += value
        for key, value in list(other.forwarded.items()):
            self.forwarded[key] += value
        for key, value in list(getattr(other, "fastopen", {}).items()):  # a worker started before the upgrade has none
            self.fastopen[key] += value
        for key, value in list(other.vip_ports.items()):
            self.vip_ports[key] += value
        self.timing = [mine + theirs for mine, theirs in zip(self.timing, other.timing)]
        self.timing_sum += other.timing_sum


class _QueueCollector:
    """The kernel's view of this front's queues, read at scrape time and summed over them. A restarted
    worker binds its queue anew, and the kernel's drop counts start again from 0: the earlier binding's
    are kept, so the sums never go down while the front runs."""

    def __init__(self, queues: range):
        self.queues = queues
        self.lock = threading.Lock()  # scrapes may run concurrently
        self.last: dict[int, dict[str, int]] = {}     # per queue: the counts last read
        self.earlier: dict[int, dict[str, int]] = {}  # per queue: what its earlier bindings counted

    def read(self) -> tuple[int, dict[str, int]] | None:
        """The queues' summed length and drops (``dropped``, ``user_dropped``); None when none was ever bound."""
        try:
            text = NFQUEUE_STATS.read_text()
        except OSError:
            return None
        length, drops = 0, {"dropped": 0, "user_dropped": 0}
        with self.lock:
            for queue in self.queues:
                stats = queue_stats(queue, text)
                last = self.last.get(queue)
                if stats is None:  # not bound now (a worker restarting): its counts so far still count
                    stats = {"length": 0, **last} if last else None
                elif last and any(stats[key] < last[key] for key in drops):
                    earlier = self.earlier.setdefault(queue, dict.fromkeys(drops, 0))
                    for key in drops:
                        earlier[key] += last[key]
                if stats is None:
                    continue
                self.last[queue] = {key: stats[key] for key in drops}
                length += stats["length"]
                for key in drops:
                    drops[key] += stats[key] + self.earlier.get(queue, {}).get(key, 0)
        return (length, drops) if self.last else None

    def collect(self):
        read = self.read()
        if read is None:
            return
        length, drops = read
        yield GaugeMetricFamily("synproxy_front_queue_length", "Packets waiting in the NFQUEUE", value=length)
        yield CounterMetricFamily("synproxy_front_queue_dropped", "Packets the kernel dropped: queue full",
                                  value=drops["dropped"])
        yield CounterMetricFamily("synproxy_front_queue_user_dropped",
                                  "Packets the kernel dropped: netlink buffer full", value=drops["user_dropped"])


class FrontMetrics:
    """Prometheus metrics of one front, served by its (parent) process.

    The per-packet counts are each queue's PacketCounts: the packet loop's own in a single process, the
    latest report of its worker otherwise, plus what the queue's dead workers had reported.
    """

    def __init__(self, queue_num: int, workers: int = 1):
        self.queues = range(queue_num, queue_num + workers)
        self.registry = CollectorRegistry()
        self.queue_stats = _QueueCollector(self.queues)
        self.registry.register(self.queue_stats)
        self.epoch = Gauge("synproxy_front_salt_epoch", "Current salt epoch", registry=self.registry)
        self.restart_required = Gauge("synproxy_front_restart_required",
                                      "1 when the configuration holds changes only a restart applies",
                                      registry=self.registry)
        self.reload_failures = health.ReloadFailures("front", self.registry)
        self.kernel_path: fastpath.FastPath | None = None
        self.data_plane = "nfqueue"
        self.xdp_modes: dict[str, str] = {}  # interface -> XDP attach mode
        self.health: health.Health | None = None
        self.announcer: Announcer | None = None
        self.counts: dict[int, PacketCounts] = {}   # queue -> its loop's counts (a worker's latest report)
        self.earlier: dict[int, PacketCounts] = {}  # queue -> what its dead workers reported
        self.restarts = 0
        self.reported = threading.Condition()  # guards the three below; notified on every report
        self.reported_at: dict[int, float] = {}  # queue -> CLOCK_MONOTONIC of its worker's latest report
        self.live: set[int] = set()              # queues whose worker runs
        self.registry.register(self)

    def report(self, queue: int, at: float, counts: PacketCounts) -> None:
        with self.reported:
            self.counts[queue], self.reported_at[queue] = counts, at
            self.reported.notify_all()

    def retire(self, queue: int) -> None:
        """A worker died: its last report moves to the queue's earlier counts, and scrapes stop waiting for it."""
        with self.reported:
            self.live.discard(queue)
            counts = self.counts.pop(queue, None)
            if counts is not None:
                self.earlier.setdefault(queue, PacketCounts()).add(counts)
            self.reported.notify_all()

    def _queue_counts(self, wait: bool = True) -> dict[int, PacketCounts]:
        """Each queue's counts for this scrape, after every live worker reported since it began (or, without
        ``wait``, as last reported: the front's own loop must not wait for its workers)."""
        since = time.monotonic()
        with self.reported:
            if wait:
                self.reported.wait_for(lambda: all(self.reported_at.get(queue, 0) >= since for queue in self.live),
                                       SCRAPE_WAIT_SECONDS)
            sources = [(queue, counts) for part in (self.earlier, self.counts) for queue, counts in part.items()]
        by_queue: dict[int, PacketCounts] = {}
        for queue, counts in sources:
            by_queue.setdefault(queue, PacketCounts()).add(counts)
        return by_queue

    def total(self) -> PacketCounts:
        """Every queue's counts summed, as last reported."""
        total = PacketCounts()
        for counts in self._queue_counts(wait=False).values():
            total.add(counts)
        return total

    def fastopen_metrics(self, total: PacketCounts):
        """TCP Fast Open (docs/metrics.md): the handler's counts and the BPF programs'."""
        issued = sum(value for result, value in total.fastopen.items() if result in FASTOPEN_COOKIE_ISSUED)
        results = defaultdict(int, total.fastopen)  # the programs' under the handler's names
        if self.kernel_path is not None:
            for path in ("tc", "xdp") if self.xdp_modes else ("tc",):
                for (outcome, _), value in self.kernel_path.counts(path).items():
                    if outcome == "fastopen_cookie_issued":
                        issued += value
                    elif outcome.startswith("fastopen_"):
                        results[outcome.removeprefix("fastopen_")] += value
        yield CounterMetricFamily("synproxy_front_fastopen_cookies_issued",
                                  "SYN-ACKs that carried a TCP Fast Open cookie", value=issued)
        yield CounterMetricFamily("synproxy_front_fastopen_accepted",
                                  "SYNs with a valid TCP Fast Open cookie forwarded to their backend",
                                  value=results["accepted"])
        fallbacks = CounterMetricFamily("synproxy_front_fastopen_fallbacks", "SYNs with a TCP Fast Open cookie "
                                        "answered with the stateless cookie SYN-ACK, by reason", labels=["reason"])
        for reason in FASTOPEN_FALLBACKS:
            fallbacks.add_metric([reason], results[reason])
        yield fallbacks

    def collect(self):
        by_queue = self._queue_counts()
        total = PacketCounts()
        workers = CounterMetricFamily("synproxy_front_worker_packets",
                                      "Packets each worker gave a verdict, by its queue", labels=["queue"])
        for queue, counts in sorted(by_queue.items()):
            total.add(counts)
            workers.add_metric([str(queue)], sum(counts.packets.values()))
        packets = CounterMetricFamily("synproxy_front_packets", "Packets handled, by outcome and IP version",
                                      labels=["outcome", "family"])
        for (outcome, family), value in total.packets.items():
            packets.add_metric([outcome, f"ipv{family}" if family in (4, 6) else "other"], value)
        yield packets
        yield from self.fastopen_metrics(total)
        forwarded = CounterMetricFamily("synproxy_front_forwarded_packets", "Packets forwarded, by backend",
                                        labels=["backend"])
        for backend, value in total.forwarded.items():
            forwarded.add_metric([backend], value)
        yield forwarded
        yield self._vip_ports(total)
        cumulative = [sum(total.timing[:index + 1]) for index in range(len(total.timing))]
        yield HistogramMetricFamily("synproxy_front_packet_processing_seconds",
                                    "Time to decide and give the verdict for one packet (1 in 16 sampled)",
                                    buckets=[*zip(map(floatToGoString, PROCESSING_BUCKETS), cumulative),
                                             ("+Inf", cumulative[-1])],
                                    sum_value=total.timing_sum)
        yield workers
        yield CounterMetricFamily("synproxy_front_worker_restarts", "Workers restarted after they died",
                                  value=self.restarts)
        data_plane = GaugeMetricFamily("synproxy_front_data_plane", "1 for the data plane this front runs",
                                       labels=["mode"])
        data_plane.add_metric([self.data_plane], 1)
        yield data_plane
        xdp = GaugeMetricFamily("synproxy_front_xdp_attached", "1 per interface the XDP program is attached to, "
                                "by attach mode", labels=["interface", "mode"])
        for interface, mode in self.xdp_modes.items():
            xdp.add_metric([interface, mode], 1)
        yield xdp
        if self.health is not None:
            yield GaugeMetricFamily("synproxy_front_ready", "1 while /readyz answers 200: the front should get "
                                    "traffic", value=1 if self.health.ready(time.monotonic()) else 0)
        if self.announcer is not None:
            announced = GaugeMetricFamily("synproxy_front_bgp_announced", "1 while the VIPs are announced to "
                                          "this BGP peer", labels=["peer"])
            established = GaugeMetricFamily("synproxy_front_bgp_established", "1 while the BGP session to this "
                                            "peer is established", labels=["peer"])
            for peer, state in self.announcer.states().items():
                announced.add_metric([peer], 1 if state["announced"] else 0)
                established.add_metric([peer], 1 if state["state"] == "established" else 0)
            yield announced
            yield established
        if self.kernel_path is not None:
            kernel = CounterMetricFamily("synproxy_front_kernel_packets",
                                         "Packets the front's BPF programs saw, by program, outcome and IP version",
                                         labels=["path", "outcome", "family"])
            for path in ("tc", "xdp") if self.xdp_modes else ("tc",):
                for (outcome, family), value in self.kernel_path.counts(path).items():
                    kernel.add_metric([path, outcome, f"ipv{family}"], value)
            yield kernel


    def _vip_ports(self, total: PacketCounts) -> CounterMetricFamily:
        """Per VIP and port, the queue's counts and the programs' together."""
        counts: defaultdict[tuple[str, int, str], int] = defaultdict(int)
        for (address, port, outcome), value in total.vip_ports.items():
            counts[str(ipaddress.ip_address(address)), port, outcome] += value
        if self.kernel_path is not None:
            for (vip, port), values in self.kernel_path.vip_port_counts().items():
                for outcome, value in zip(fastpath.VIP_PORT_OUTCOMES, values):
                    counts[str(vip), port, outcome] += value
        family = CounterMetricFamily("synproxy_front_vip_packets", "SYNs answered, handshake ACKs validated and "
                                     "packets forwarded, per VIP and port", labels=["vip", "port", "outcome"])
        for (vip, port, outcome), value in sorted(counts.items()):
            family.add_metric([vip, str(port), outcome], value)
        return family


class _BoundedReader:
    """The queue's socket as NetfilterQueue.run_socket() reads it, ending the run when housekeeping is due.

    run() and run_socket() only return once the socket is empty, never under a sustained flood. An
    exception raised from the packet callback gets out too, but libnetfilter_queue then abandons
    the rest of the buffer being handled, and a packet without a verdict holds a queue slot for
    good. Saying "nothing more to read" between buffers ends the run with every packet answered.
    """

    def __init__(self, sock: socket.socket, front: Front):
        self.sock = sock
        self.front = front

    def recv(self, size: int) -> bytes:
        front = self.front
        if front.stop_due() or front.reload_requested or time.monotonic() >= front.housekeeping_due:
            raise BlockingIOError(errno.EAGAIN, "housekeeping due")
        return self.sock.recv(size)


@dataclass
class Worker:
    """A forked worker, as its parent knows it."""
    queue: int
    pid: int
    channel: socket.socket  # the parent's end: the worker's reports arrive on it; EOF when it ends
    started: float          # CLOCK_MONOTONIC


_libc = ctypes.CDLL(None, use_errno=True)


def _exit_with_parent(parent_pid: int) -> None:
    """The kernel kills this worker when the front's process ends, however it ends (kill -9 runs no
    cleanup): no worker outlives its front holding a queue. A parent gone before the call is checked."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        os._exit(1)


def _send(channel: socket.socket, message: tuple) -> bool:
    """One message to the other end, never blocking (a stopped parent must not stop the packet loop: the
    next report carries the same totals); False when the other end is gone."""
    try:
        channel.send(pickle.dumps(message), socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def _exit_status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


class Front:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.rotation = SecretRotation()
        self.previous_owners = PreviousOwners(PREVIOUS_TABLE_SECONDS)  # the window follows the configuration
        self.load()
        log_warnings(self.config)
        self.metrics = FrontMetrics(self.config.front.queue_num, self.config.front.workers)
        self.counts = PacketCounts()  # this process's packet loop's (a worker makes its own)
        try:
            self.raw_ipv4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError:
            raise SystemExit("synproxy front: cannot open a raw socket: this needs root (CAP_NET_RAW)") from None
        self.too_big_answers = TokenBucket(TOO_BIG_PER_SECOND, TOO_BIG_BURST)
        self.icmp_errors = TokenBucket(ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_BURST)
        self.fastopen_limit = FastOpenLimit()  # per process: each worker's queue gets its own CPUs' share
        self.failures = FailureLog()
        self.stop_requested: list[bool] = []
        self.reload_requested: list[bool] = []
        self.draining = False
        self.stop_at: float | None = None  # once stopping: when the routers have had the withdrawal long enough
        self.health = health.Health()
        self.notifier = Notifier()
        self.attack_summary = AttackSummary()
        self.announcer: Announcer | None = None
        self.salts_epoch: int | None = None  # the epoch of the fast path's last successful salt refresh
        self.housekeeping_due = 0.0
        self.packets_seen = 0
        self.kernel_path: fastpath.FastPath | None = None
        self.rules: firewall.RawChain | None = None
        self.protected: tuple = ((), ())  # the VIPs and ports the rules hold
        self.workers: dict[int, Worker] = {}  # queue -> its worker (front.workers above 1)
        self.worker_queue: int | None = None   # in a worker: its queue
        self.channel: socket.socket | None = None  # in a worker: its end towards the parent

    def load(self) -> None:
        config = load_config(self.config_path)
        configured_schedule = config.salt_schedule()
        schedule = self.rotation.effective(configured_schedule, getattr(self, "schedule", None), time.time())
        self.policy = build_policy(config, schedule, self.previous_owners)
        self.configured_schedule, self.schedule, self.config = configured_schedule, schedule, config
        self.backend_labels = tuple(str(ipaddress.ip_address(b)) for b in self.policy.backends)  # Verdict.backend

    def expire_retired_secrets(self) -> None:
        schedule = self.rotation.effective(self.configured_schedule, self.schedule, time.time())
        if schedule.secrets != self.schedule.secrets:
            self.schedule = schedule
            log("retired_secrets_expired", secrets_accepted=len(schedule.secrets))

    def on_packet(self, packet) -> None:
        self.packets_seen += 1
        timed = not self.packets_seen & TIMING_SAMPLE_MASK
        if timed:
            started = time.perf_counter()
        family, backend, fastopen, payload = 0, -1, "", b""
        try:
            payload = packet.get_payload()
            family = payload[0] >> 4 if payload else 0
            action, reply, outcome, backend, fastopen = handle(payload, time.time(), self.schedule, self.policy,
                                                               self.fastopen_limit)
            if action is Action.DROP:
                packet.drop()
            elif outcome == ICMP_FORWARDED and not self.icmp_errors.take(time.monotonic()):
                packet.drop()
                outcome = "icmp_rate_limited"
            elif action is Action.FORWARD and family == 6:
                # The encapsulation is IPv4: a queued IPv6 packet cannot become one in place, so it
                # leaves through a raw socket and the original is dropped.
                packet.drop()
                self.raw_ipv4.sendto(reply, (socket.inet_ntoa(reply[16:20]), 0))
            elif outcome == TOO_BIG and not self.too_big_answers.take(time.monotonic()):
                packet.drop()
                outcome = "too_big_rate_limited"
            else:
                packet.set_payload(reply)
                packet.accept()
        except Exception as error:  # noqa: BLE001 - whatever failed, the packet gets a verdict, the loop goes on
            # The one system call above is the raw socket's sendto (EMSGSIZE, ENETUNREACH, EPERM...).
            outcome, backend = send_failure(error) if isinstance(error, OSError) else "internal_error", -1
            with contextlib.suppress(RuntimeError):  # "verdict already given": a send failed after its drop
                packet.drop()
            self.failures.note(outcome, error, time.monotonic())
        counts = self.counts
        counts.packets[outcome, family] += 1
        if backend >= 0:
            counts.forwarded[self.backend_labels[backend]] += 1
        if fastopen:
            counts.fastopen[fastopen] += 1
        if outcome in VIP_PORT_OUTCOME:
            counts.vip_ports[(*destination(payload), VIP_PORT_OUTCOME[outcome])] += 1
        if timed:
            counts.observe(time.perf_counter() - started)

    def run(self) -> int:
        config = self.config
        queue_num, workers = config.front.queue_num, config.front.workers
        try:  # before anything is installed: a second front would take over this one's rules, then remove them
            self.instance_lock = instance.claim("front")
        except instance.AlreadyRunning as error:
            raise SystemExit(f"synproxy front: {error}") from None
        self.running = restart_settings(config)
        self.metrics.health = self.health
        if config.front.metrics_address:
            try:
                health.serve(config.front.metrics_address, self.metrics.registry, self.health, "front")
            except OSError as error:
                raise SystemExit(f"synproxy front: cannot serve metrics on {config.front.metrics_address}: "
                                 f"{error.strerror}") from None
        stop, reload = self.stop_requested, self.reload_requested
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        signal.signal(signal.SIGINT, lambda *_: stop.append(True))
        signal.signal(signal.SIGHUP, lambda *_: reload.append(True))
        signal.signal(signal.SIGUSR1, lambda *_: self.set_draining(True))
        signal.signal(signal.SIGUSR2, lambda *_: self.set_draining(False))
        cpus = os.cpu_count() or 1
        if workers > cpus:
            log("config_warning", warning=f"{config.where('front.workers')}: {workers} workers on {cpus} online "
                "CPUs: --queue-cpu-fanout queues by CPU, so the queues past the CPU count get no packets")
        queue = bind_queue(queue_num, self.on_packet) if workers == 1 else None
        started = False
        try:
            if queue is not None:
                self.metrics.counts[queue_num] = self.counts
            else:
                self.start_workers()  # each binds its queue before the rules send packets there
            ensure_sysctls(config)
            self.rules = firewall.front_chain(queue_num, workers)
            self.protected = (config.vips, config.ports)
            self.rules.install(*self.protected)
            interfaces = config.front.interfaces or default_route_interfaces()
            try:
                mode, self.kernel_path, xdp_modes, reason = fastpath.select(
                    config.front.data_plane, interfaces, config.front.xdp_mode, self.policy, self.schedule)
            except fastpath.FastPathError as error:
                raise SystemExit(f"synproxy: front data plane {config.front.data_plane}: {error}") from None
            self.metrics.kernel_path, self.metrics.data_plane = self.kernel_path, mode
            self.metrics.xdp_modes = xdp_modes
            log("data_plane_selected", mode=mode, interfaces=list(interfaces) if self.kernel_path else [],
                xdp_modes=xdp_modes, reason=reason)
            self.announcer = self.metrics.announcer = self.start_announcer(config)
            log("front_started", queue=queue_num, workers=workers, vips=[str(v) for v in config.vips],
                ports=list(config.ports), backends=[str(b) for b in config.backends],
                farm_address=str(farm_address(config)), data_plane=mode)
            started = True
            if queue is not None:
                self.serve(queue, self.housekeeping, HOUSEKEEPING_SECONDS)
            else:
                self.supervise()
        finally:
            if self.announcer is not None:
                self.announcer.close()
            if self.kernel_path is not None:
                self.kernel_path.close()
            if self.rules is not None:
                self.rules.remove(*self.protected)
            if queue is not None:
                queue.unbind()
            self.stop_workers()
            if started:
                log("front_stopped", queue=queue_num)
        return 0

    def serve(self, queue: NetfilterQueue, housekeeping, seconds: float) -> None:
        """The packet loop on one queue, calling ``housekeeping`` every ``seconds`` until the stop (SIGTERM,
        then the stop wait ``housekeeping`` sets: the queue is answered meanwhile).

        A duplicate of the queue's descriptor, read blocking with the kernel's receive timeout: one
        system call per packet (a select() before each non-blocking read cost twice the CPU per SYN at
        10k SYN/s; Python's own socket timeout polls before every read too). When the timeout expires
        the read fails with EAGAIN, which ends run_socket()."""
        sock = socket.fromfd(queue.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))
        reader = _BoundedReader(sock, self)
        try:
            while self.serving():
                housekeeping()
                self.housekeeping_due = time.monotonic() + seconds
                if self.serving():
                    queue.run_socket(reader)
        finally:
            sock.close()

    def serving(self) -> bool:
        """Not stopping, or stopping but still within the stop wait."""
        return self.stop_at is None or time.monotonic() < self.stop_at

    def stop_due(self) -> bool:
        """SIGTERM arrived and the loop has not yet begun the stop (the next housekeeping does)."""
        return bool(self.stop_requested) and self.stop_at is None

    def housekeeping(self) -> None:
        """The front's own (its single loop's, or its parent's with workers): the stop (withdraw, then wait),
        the salt epoch, retired secrets, former owners whose window ended, a reload SIGHUP asked for, the
        programs' salts and clock, the health checks and heartbeat, the attack summary and the BGP
        announcer."""
        if self.stop_due():
            wait = self.config.front.bgp.stop_wait_seconds if self.announcer and self.announcer.announced() else 0
            self.stop_at = time.monotonic() + wait
            log("front_stopping", withdraw_wait_seconds=wait)
            self.notifier.notify("STOPPING=1")
        self.metrics.epoch.set(self.schedule.current_epoch(time.time()))
        self.expire_retired_secrets()
        chain_expired = self.previous_owners.expire(time.monotonic())
        if self.reload_requested:
            self.reload_requested.clear()
            self.reload()
        if self.kernel_path is not None:
            try:
                if chain_expired:
                    self.kernel_path.write_maglev(self.policy)
                self.kernel_path.refresh(self.policy, self.schedule, time.time())
                self.salts_epoch = self.schedule.current_epoch(time.time())
            except fastpath.FastPathError as error:  # its SYNs fall back to the queue (no_salt)
                log("kernel_path_refresh_failed", error=str(error))
        now = time.monotonic()
        self.health.beat(self.health_checks(), now)
        self.notifier.beat(self.health.summary(now))
        if self.attack_summary.due(now):
            summary = self.attack_summary.update(self.totals(), now)
            if summary:
                log(summary.pop("event"), **summary)
        if self.announcer is not None:
            self.announcer.tick(self.health.ready(now), now)

    def totals(self) -> dict[str, int]:
        """Packets by outcome over the queues (every worker's reported counts) and the programs (what
        AttackSummary reads), and the kernel's queue drops."""
        totals: defaultdict[str, int] = defaultdict(int)
        for (outcome, _), value in list(self.metrics.total().packets.items()):
            totals[outcome] += value
        if self.kernel_path is not None:
            for path in ("tc", "xdp") if self.metrics.xdp_modes else ("tc",):
                for (outcome, _), value in self.kernel_path.counts(path).items():
                    if outcome != "not_protected":  # the node's other traffic
                        totals[outcome] += value
        queues = self.metrics.queue_stats.read()
        if queues is not None:
            _, drops = queues
            totals["queue_dropped"] = drops["dropped"] + drops["user_dropped"]
        return dict(totals)

    def start_announcer(self, config: Config) -> Announcer | None:
        """BGP sessions to front.bgp.peers (or the default route's gateways), when front.bgp is set."""
        settings = config.front.bgp
        if settings is None or settings.local_as is None:
            return None
        peers = list(settings.peers) or default_gateways()
        if not peers:
            raise SystemExit("synproxy front: front.bgp.peers is empty and this node has no IPv4 default route "
                             "to take a router from")
        log("bgp_peers", peers=[str(peer) for peer in peers], local_as=settings.local_as, peer_as=settings.peer_as,
            hold_time=settings.hold_time_seconds)
        return Announcer(settings, config.vips, peers)

    def set_draining(self, draining: bool) -> None:
        """SIGUSR1 / SIGUSR2: readiness (and so the announcement) off or back on; packets are still answered."""
        self.draining = draining
        log("front_draining" if draining else "front_undrained")

    def queue_problems(self) -> list[str]:
        """Why some queue of this front is not being read: not bound, or (with workers) its worker dead,
        restarting or silent for WORKER_SILENT_SECONDS."""
        try:
            text = NFQUEUE_STATS.read_text()
        except OSError:
            text = ""
        problems = []
        now = time.monotonic()
        for queue in self.metrics.queues:
            if len(self.metrics.queues) > 1:
                worker = self.workers.get(queue)
                if worker is None:
                    problems.append(f"the worker for NFQUEUE {queue} is not running")
                    continue
                with self.metrics.reported:
                    reported = max(self.metrics.reported_at.get(queue, 0.0), worker.started)
                if now - reported > WORKER_SILENT_SECONDS:
                    problems.append(f"the worker for NFQUEUE {queue} (pid {worker.pid}) has not reported for "
                                    f"{now - reported:.0f} s")
                    continue
            if queue_stats(queue, text) is None:
                problems.append(f"NFQUEUE {queue} is not bound")
        return problems

    def health_checks(self) -> dict[str, str | None]:
        """What /readyz and the announcement follow (synproxy/health.py): the data plane attached (every
        queue bound and read, the programs still on their interfaces), the salts the programs hold current,
        and neither a drain nor a stop asked for."""
        missing = self.kernel_path.missing() if self.kernel_path is not None else []
        problems = self.queue_problems() + [f"program gone: {m}" for m in missing]
        salts = None
        if self.kernel_path is not None:
            epoch = self.schedule.current_epoch(time.time())
            # The programs hold the salts up to the epoch after the last refresh's (FastPath.refresh).
            if self.salts_epoch is None or not self.salts_epoch <= epoch <= self.salts_epoch + 1:
                salts = f"the programs' salts were last refreshed for epoch {self.salts_epoch}, now {epoch}"
        return {"loop": None, "data_plane": "; ".join(problems) or None, "salts": salts,
                "draining": "draining (SIGUSR1; SIGUSR2 ends it)" if self.draining else None,
                # Once the stop has begun, not when SIGTERM arrived: a SIGTERM during a housekeeping would
                # otherwise withdraw before the stop saw the announcement, and skip the stop wait.
                "stopping": "stopping" if self.stop_at is not None else None}

    def reload(self) -> None:
        """SIGHUP: the configuration and secrets again; the queue's rules and the fast path's maps follow
        the VIPs and ports, and the workers reload too. The RESTART_KEYS keep their running values, and are
        reported instead."""
        try:
            self.load()
            log_warnings(self.config)
            ensure_sysctls(self.config)
            wanted = (self.config.vips, self.config.ports)
            if wanted != self.protected:
                self.rules.replace(self.protected, wanted)
                self.protected = wanted
            if self.kernel_path is not None:
                self.kernel_path.configure(self.policy, self.schedule)
        except (ConfigError, firewall.FirewallError, fastpath.FastPathError) as error:
            self.metrics.reload_failures.inc()
            log("config_reload_failed", error=str(error))
            return
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):  # it just died: it restarts with this configuration
                os.kill(worker.pid, signal.SIGHUP)
        pending = [key for key, running, wanted in zip(RESTART_KEYS, self.running, restart_settings(self.config))
                   if running != wanted]
        self.metrics.restart_required.set(1 if pending else 0)
        if pending:
            log("restart_required", keys=pending, source=str(self.config.source),
                note="the rest of the configuration is applied; these keys keep their running values")
        else:
            log("config_reloaded", source=str(self.config.source), secrets_accepted=len(self.schedule.secrets))

    # --- workers (front.workers above 1) ---------------------------------------------------------

    def start_workers(self) -> None:
        """One worker per queue, each bound before this returns; one that cannot bind is this start's error."""
        for queue in self.metrics.queues:
            self.spawn(queue)
        deadline = time.monotonic() + WORKER_START_SECONDS
        for worker in self.workers.values():
            worker.channel.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                data = worker.channel.recv(1 << 16)
            except TimeoutError:
                raise SystemExit(f"synproxy front: the worker for queue {worker.queue} did not start within "
                                 f"{WORKER_START_SECONDS:.0f} s") from None
            finally:
                worker.channel.setblocking(False)  # as spawn() left it
            kind, detail = pickle.loads(data) if data else ("failed", None)
            if kind == "failed":
                raise SystemExit(detail or f"synproxy front: the worker for queue {worker.queue} ended at start")

    def spawn(self, queue: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            self.work(queue, child_end, parent_pid)
        child_end.close()
        parent_end.setblocking(False)
        self.workers[queue] = Worker(queue, pid, parent_end, time.monotonic())
        with self.metrics.reported:
            self.metrics.live.add(queue)
        log("worker_started", queue=queue, pid=pid)

    def work(self, queue_num: int, channel: socket.socket, parent_pid: int) -> NoReturn:
        """A worker, in the forked child: binds its queue and runs the packet loop. It leaves by os._exit,
        never back into the parent's code (whose finally blocks remove the rules). The signal handlers
        are the parent's, appending to this process's copies of its lists."""
        code = 1
        try:
            _exit_with_parent(parent_pid)
            for sibling in self.workers.values():
                sibling.channel.close()
            # The parent's: a worker never touches the programs, the BGP sessions or systemd (its copies of
            # the sessions' sockets close with the last reference: the parent's Cease must end them).
            self.workers, self.kernel_path, self.announcer, self.notifier = {}, None, None, None
            self.metrics.announcer = None
            self.worker_queue, self.channel, self.counts = queue_num, channel, PacketCounts()
            try:
                queue = bind_queue(queue_num, self.on_packet)
            except SystemExit as error:
                _send(channel, ("failed", str(error)))
                log("worker_failed", queue=queue_num, error=str(error))
                os._exit(1)
            _send(channel, ("ready", None))
            try:
                self.serve(queue, self.worker_housekeeping, WORKER_REPORT_SECONDS)
            finally:
                queue.unbind()
            code = 0
        except BaseException as error:  # noqa: BLE001 - logged; the parent restarts the worker
            where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
            log("worker_failed", queue=queue_num, error=f"{type(error).__name__}: {error}",
                where=f"{where.filename}:{where.lineno}" if where else None)
        finally:
            os._exit(code)

    def worker_housekeeping(self) -> None:
        """A worker's: its stop (at once: the parent's stop wait ends with its SIGTERM), retired secrets, former
        owners whose window ended (its own copy of the history, forked from its parent's and following the
        same reloads), a reload its parent forwarded (SIGHUP), and its counts to the parent."""
        if self.stop_due():
            self.stop_at = time.monotonic()
        self.expire_retired_secrets()
        self.previous_owners.expire(time.monotonic())
        if self.reload_requested:
            self.reload_requested.clear()
            try:
                self.load()
            except ConfigError as error:  # the files changed since the parent's reload: the parent counts it
                log("config_reload_failed", queue=self.worker_queue, error=str(error))
                _send(self.channel, ("reload_failed", None))
            else:
                log("worker_reloaded", queue=self.worker_queue, secrets_accepted=len(self.schedule.secrets))
        if not _send(self.channel, ("counts", (time.monotonic(), self.counts))):
            self.stop_at = time.monotonic()  # the parent is gone

    def supervise(self) -> None:
        """The parent's loop with workers: its housekeeping, the workers' reports, and a worker that died
        logged and forked again (at most once per RESTART_SECONDS per queue; not once stopping)."""
        restart_at: dict[int, float] = {}
        while self.serving():
            self.housekeeping()
            for queue, due in list(restart_at.items()):
                if due <= time.monotonic() and self.stop_at is None:
                    del restart_at[queue]
                    self.spawn(queue)
                    self.metrics.restarts += 1
            deadline = min(time.monotonic() + HOUSEKEEPING_SECONDS, self.stop_at or float("inf"))
            while not self.stop_due() and not self.reload_requested and time.monotonic() < deadline:
                channels = {worker.channel: worker for worker in self.workers.values()}
                readable, _, _ = select.select(list(channels), [], [], max(0.0, deadline - time.monotonic()))
                for channel in readable:
                    worker = channels[channel]
                    if not self.receive(worker):
                        self.reap(worker)
                        restart_at[worker.queue] = max(time.monotonic(), worker.started + RESTART_SECONDS)

    def receive(self, worker: Worker) -> bool:
        """Every message waiting from a worker; False once it ended (EOF)."""
        while True:
            try:
                data = worker.channel.recv(1 << 20)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            kind, detail = pickle.loads(data)
            if kind == "counts":
                self.metrics.report(worker.queue, *detail)
            elif kind == "reload_failed":  # it logged why, and keeps its older configuration
                self.metrics.reload_failures.inc()
            elif kind == "failed":  # it logged why, and exits
                return False

    def reap(self, worker: Worker) -> None:
        """A worker whose channel closed: wait for its exit (killing one that lingers), log it, keep its counts."""
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        while (finished := os.waitpid(worker.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(worker.pid, signal.SIGKILL)
                finished = os.waitpid(worker.pid, 0)
                break
            time.sleep(0.01)
        worker.channel.close()
        del self.workers[worker.queue]
        self.metrics.retire(worker.queue)
        log("worker_exited", queue=worker.queue, pid=worker.pid, **_exit_status(finished[1]))

    def stop_workers(self) -> None:
        """SIGTERM every worker, then SIGKILL what has not exited within WORKER_STOP_SECONDS."""
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for worker in self.workers.values():
            while os.waitpid(worker.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)
                    break
                time.sleep(0.01)
            worker.channel.close()
        self.workers.clear()


def restart_settings(config: Config) -> tuple:
    """The values of RESTART_KEYS, in that order."""
    front = config.front
    return front.queue_num, front.metrics_address, front.data_plane, front.interfaces, front.xdp_mode, front.workers


def fetch(url: str) -> tuple[int, bytes]:
    """An HTTP GET's status and body (a 503 from /readyz is an answer, not a failure)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def running_stats(config: Config) -> dict:
    """The running front's readiness and counters, read from its metrics endpoint (the NFQUEUE path's
    counts live in that process only)."""
    address = config.front.metrics_address
    if not address:
        raise SystemExit("synproxy front: this needs front.metrics_address: the counts are read from the running "
                         "front's metrics endpoint")
    try:
        _, ready = fetch(health.local_url(address, "/readyz"))
        _, text = fetch(health.local_url(address, "/metrics"))
    except OSError as error:
        raise SystemExit(f"synproxy front: no front answers on {address} ({getattr(error, 'reason', error)})") from None
    stats = {**json.loads(ready), "packets": {}, "kernel_packets": {}, "bgp": {}}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "synproxy_front_packets_total":
                stats["packets"][labels["outcome"]] = stats["packets"].get(labels["outcome"], 0) + int(sample.value)
            elif sample.name == "synproxy_front_kernel_packets_total":
                key = f"{labels['path']}:{labels['outcome']}"
                stats["kernel_packets"][key] = stats["kernel_packets"].get(key, 0) + int(sample.value)
            elif sample.name in ("synproxy_front_bgp_announced", "synproxy_front_bgp_established"):
                stats["bgp"].setdefault(labels["peer"], {})[sample.name.rpartition("_")[2]] = bool(sample.value)
    return stats


def handled(stats: dict) -> int:
    """Packets to the VIPs this front has handled, by the queue or its programs (a program's
    not_protected packets are the node's other traffic: BGP, scrapes)."""
    return sum(stats["packets"].values()) + sum(value for key, value in stats["kernel_packets"].items()
                                                 if not key.endswith(":not_protected"))


def print_stats(stats: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats))
        return
    print(f"{'ready':24} {stats['ready']}")
    for name, verdict in stats["checks"].items():
        print(f"  {name:22} {verdict}")
    for peer, state in stats["bgp"].items():
        print(f"{'bgp ' + peer:24} {'established' if state.get('established') else 'down'}, "
              f"{'announced' if state.get('announced') else 'withdrawn'}")
    for outcome, value in sorted(stats["packets"].items()):
        print(f"{outcome:24} {value}")
    for key, value in sorted(stats["kernel_packets"].items()):
        if value:
            print(f"{key:24} {value}")


def drain(config: Config, timeout: float, quiet_seconds: float = 1.0) -> int:
    """Withdraw the running front (SIGUSR1) and wait until it has handled no packet for ``quiet_seconds``:
    the routers have moved its traffic (new connections and established ones alike: any front serves
    both). Bounded by ``timeout``."""
    pid = instance.holder("front")
    if pid is None:
        raise SystemExit("synproxy front: no front runs in this network namespace")
    os.kill(pid, signal.SIGUSR1)
    if not config.front.metrics_address:
        print(f"front {pid}: draining (no front.metrics_address to watch its traffic move)")
        return 0
    started = time.monotonic()
    last, quiet_since, stats = None, time.monotonic(), {"bgp": {}}
    while time.monotonic() - started < timeout:
        stats = running_stats(config)
        count = handled(stats)
        withdrawn = stats["checks"].get("draining", "ok") != "ok" and not any(
            state.get("announced") for state in stats["bgp"].values())
        if count != last or not withdrawn:
            last, quiet_since = count, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_seconds:
            print(f"front {pid}: drained: withdrawn, no packet for {quiet_seconds:g} s, "
                  f"after {time.monotonic() - started:.1f} s")
            return 0
        time.sleep(0.1)
    print(f"front {pid}: draining, but still handling packets after {timeout:g} s"
          f"{'' if stats['bgp'] else ' (no front.bgp: the routers must follow /readyz to move the traffic)'}",
          file=sys.stderr)
    return 1


def main(args: argparse.Namespace) -> int:
    if args.stats or args.drain:
        config = load_config(args.config)
        if args.drain:
            return drain(config, args.timeout)
        print_stats(running_stats(config), args.json)
        return 0
    if args.undrain:
        pid = instance.holder("front")
        if pid is None:
            raise SystemExit("synproxy front: no front runs in this network namespace")
        os.kill(pid, signal.SIGUSR2)
        print(f"front {pid}: drain ended; it announces again once ready")
        return 0
    return Front(args.config).run()

