"""`synproxy front`: the NFQUEUE shell around the sans-IO handler.

It installs its packet-filter rules, binds the queue, gives every packet one verdict (the SYN-ACK or
the encapsulated packet replaces the payload; everything else is dropped), serves its metrics, and
removes its rules on exit. SIGHUP reloads the configuration and the secrets. Whatever happens while
handling a packet, the packet gets a verdict (a drop, counted by reason) and the loop goes on: one
packet must not stop a front.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import signal
import socket
import struct
import time
import traceback
from collections import defaultdict
from pathlib import Path

from netfilterqueue import NetfilterQueue
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from synproxy import firewall, instance
from synproxy.config import PREVIOUS_TABLE_SECONDS, Config, ConfigError, load_config, log_warnings
from synproxy.encap import encap_key
from synproxy.front import fastpath
from synproxy.front.handler import TOO_BIG, Action, FrontPolicy, TokenBucket, handle
from synproxy.logs import log
from synproxy.maglev import PreviousOwners
from synproxy.netlink import default_route_interfaces, local_addresses
from synproxy.salt import SaltSchedule, SecretRotation

QUEUE_MAX_LENGTH = 8192
# The netlink socket must hold a full queue: netfilterqueue sizes it for its default of 1024
# packets, and with that the kernel dropped a third of a 10k SYN/s flood (user_dropped) while
# this process was 65 % idle, every scheduling hiccup overflowing it. ~830 bytes of truesize per
# queued SYN; 2 KiB a packet leaves room for full-size ones.
SOCKET_BUFFER_BYTES = QUEUE_MAX_LENGTH * 2048
NFQUEUE_STATS = Path("/proc/net/netfilter/nfnetlink_queue")
# Timing every packet into a histogram would cost as much as handling it: time one in 16.
TIMING_SAMPLE_MASK = 15
HOUSEKEEPING_SECONDS = 0.5  # how often the loop handles signals, salt epochs and secret expiry
# Forwarding for the rewritten packets; accept_local because an encapsulated packet leaves with this
# node's own address as source, which the kernel otherwise drops as a martian when it routes it.
FRONT_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.accept_local": "1"}
IPV6_FRONT_SYSCTLS = {"net.ipv6.conf.all.forwarding": "1"}  # only with an IPv6 VIP
# ICMP "too big" answers: a router's rate (Linux's icmp_ratelimit is ~1 per second per destination; a
# front answers many clients), so a flood of big packets gets small answers only, and few.
TOO_BIG_PER_SECOND, TOO_BIG_BURST = 100, 200
FAILURE_LOG_SECONDS = 10.0  # a packet that fails once fails as often as someone sends it: log each reason this often
# What a reload cannot change in a running front: the queue it holds, its metrics socket, its programs.
RESTART_KEYS = ("front.queue_num", "front.metrics_address", "front.data_plane", "front.interfaces",
                "front.xdp_mode")


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
                         farm_mtu=config.farm_mtu, weights=tuple(entry.weight for entry in active),
                         draining=tuple((entry.address.packed, entry.weight) for entry in entries if entry.drain),
                         down=frozenset(entry.address.packed for entry in entries if entry.down), previous=previous)
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


class _QueueCollector:
    """The kernel's view of this front's queue, read at scrape time."""

    def __init__(self, queue_num: int):
        self.queue_num = queue_num

    def collect(self):
        try:
            stats = queue_stats(self.queue_num, NFQUEUE_STATS.read_text())
        except OSError:
            stats = None
        if stats is None:
            return
        yield GaugeMetricFamily("synproxy_front_queue_length", "Packets waiting in the NFQUEUE",
                                value=stats["length"])
        yield CounterMetricFamily("synproxy_front_queue_dropped", "Packets the kernel dropped: queue full",
                                  value=stats["dropped"])
        yield CounterMetricFamily("synproxy_front_queue_user_dropped",
                                  "Packets the kernel dropped: netlink buffer full", value=stats["user_dropped"])


class FrontMetrics:
    """Prometheus metrics of one front process.

    The per-packet counts are plain integers the packet loop adds to (Front.on_packet) and a
    collector reads at scrape time: a prometheus_client Counter takes a lock on every increment.
    """

    def __init__(self, queue_num: int):
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(queue_num))
        self.processing = Histogram("synproxy_front_packet_processing_seconds",
                                    "Time to decide and give the verdict for one packet (1 in 16 sampled)",
                                    buckets=(2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2),
                                    registry=self.registry)
        self.epoch = Gauge("synproxy_front_salt_epoch", "Current salt epoch", registry=self.registry)
        self.restart_required = Gauge("synproxy_front_restart_required",
                                      "1 when the configuration holds changes only a restart applies",
                                      registry=self.registry)
        self.kernel_path: fastpath.FastPath | None = None
        self.data_plane = "nfqueue"
        self.xdp_modes: dict[str, str] = {}  # interface -> XDP attach mode
        self.packets: defaultdict[tuple[str, int], int] = defaultdict(int)  # (outcome, IP version)
        # By backend address, not position: a reload may add, remove or reorder backends.
        self.forwarded: defaultdict[str, int] = defaultdict(int)
        self.registry.register(self)

    def collect(self):
        packets = CounterMetricFamily("synproxy_front_packets", "Packets handled, by outcome and IP version",
                                      labels=["outcome", "family"])
        for (outcome, family), value in list(self.packets.items()):
            packets.add_metric([outcome, f"ipv{family}" if family in (4, 6) else "other"], value)
        yield packets
        forwarded = CounterMetricFamily("synproxy_front_forwarded_packets", "Packets forwarded, by backend",
                                        labels=["backend"])
        for backend, value in list(self.forwarded.items()):
            forwarded.add_metric([backend], value)
        yield forwarded
        data_plane = GaugeMetricFamily("synproxy_front_data_plane", "1 for the data plane this front runs",
                                       labels=["mode"])
        data_plane.add_metric([self.data_plane], 1)
        yield data_plane
        xdp = GaugeMetricFamily("synproxy_front_xdp_attached", "1 per interface the XDP program is attached to, "
                                "by attach mode", labels=["interface", "mode"])
        for interface, mode in self.xdp_modes.items():
            xdp.add_metric([interface, mode], 1)
        yield xdp
        if self.kernel_path is not None:
            kernel = CounterMetricFamily("synproxy_front_kernel_packets",
                                         "Packets the front's BPF programs saw, by program, outcome and IP version",
                                         labels=["path", "outcome", "family"])
            for path in ("tc", "xdp") if self.xdp_modes else ("tc",):
                for (outcome, family), value in self.kernel_path.counts(path).items():
                    kernel.add_metric([path, outcome, f"ipv{family}"], value)
            yield kernel


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
        if front.stop_requested or front.reload_requested or time.monotonic() >= front.housekeeping_due:
            raise BlockingIOError(errno.EAGAIN, "housekeeping due")
        return self.sock.recv(size)


class Front:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.rotation = SecretRotation()
        self.previous_owners = PreviousOwners(PREVIOUS_TABLE_SECONDS)  # the window follows the configuration
        self.load()
        self.metrics = FrontMetrics(self.config.front.queue_num)
        try:
            self.raw_ipv4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError:
            raise SystemExit("synproxy front: cannot open a raw socket: this needs root (CAP_NET_RAW)") from None
        self.too_big_answers = TokenBucket(TOO_BIG_PER_SECOND, TOO_BIG_BURST)
        self.failures = FailureLog()
        self.stop_requested: list[bool] = []
        self.reload_requested: list[bool] = []
        self.housekeeping_due = 0.0
        self.packets_seen = 0
        self.kernel_path: fastpath.FastPath | None = None
        self.rules: firewall.RawChain | None = None
        self.protected: tuple = ((), ())  # the VIPs and ports the rules hold

    def load(self) -> None:
        config = load_config(self.config_path)
        log_warnings(config)
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
        family, backend = 0, -1
        try:
            payload = packet.get_payload()
            family = payload[0] >> 4 if payload else 0
            action, reply, outcome, backend = handle(payload, time.time(), self.schedule, self.policy)
            if action is Action.DROP:
                packet.drop()
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
        metrics = self.metrics
        metrics.packets[outcome, family] += 1
        if backend >= 0:
            metrics.forwarded[self.backend_labels[backend]] += 1
        if timed:
            metrics.processing.observe(time.perf_counter() - started)

    def run(self) -> int:
        config = self.config
        queue_num = config.front.queue_num
        try:  # before anything is installed: a second front would take over this one's rules, then remove them
            self.instance_lock = instance.claim("front")
        except instance.AlreadyRunning as error:
            raise SystemExit(f"synproxy front: {error}") from None
        self.running = restart_settings(config)
        if config.front.metrics_address:
            host, _, port = config.front.metrics_address.rpartition(":")
            try:
                start_http_server(int(port), host.strip("[]"), registry=self.metrics.registry)
            except OSError as error:
                raise SystemExit(f"synproxy front: cannot serve metrics on {config.front.metrics_address}: "
                                 f"{error.strerror}") from None
        stop, reload = self.stop_requested, self.reload_requested
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        signal.signal(signal.SIGINT, lambda *_: stop.append(True))
        signal.signal(signal.SIGHUP, lambda *_: reload.append(True))
        queue = bind_queue(queue_num, self.on_packet)
        ensure_sysctls(config)
        self.rules = firewall.front_chain(queue_num)
        self.rules.install(config.vips, config.ports)
        self.protected = (config.vips, config.ports)
        interfaces = config.front.interfaces or default_route_interfaces()
        try:
            mode, self.kernel_path, xdp_modes, reason = fastpath.select(
                config.front.data_plane, interfaces, config.front.xdp_mode, self.policy, self.schedule)
        except fastpath.FastPathError as error:
            self.rules.remove(config.vips, config.ports)
            queue.unbind()
            raise SystemExit(f"synproxy: front data plane {config.front.data_plane}: {error}") from None
        self.metrics.kernel_path, self.metrics.data_plane, self.metrics.xdp_modes = self.kernel_path, mode, xdp_modes
        log("data_plane_selected", mode=mode, interfaces=list(interfaces) if self.kernel_path else [],
            xdp_modes=xdp_modes, reason=reason)
        log("front_started", queue=queue_num, vips=[str(v) for v in config.vips], ports=list(config.ports),
            backends=[str(b) for b in config.backends], farm_address=str(farm_address(config)), data_plane=mode)
        # A duplicate of the queue's descriptor, read blocking with the kernel's receive timeout:
        # one system call per packet (a select() before each non-blocking read cost twice the CPU
        # per SYN at 10k SYN/s; Python's own socket timeout polls before every read too). When the
        # timeout expires the read fails with EAGAIN, which ends run_socket().
        sock = socket.fromfd(queue.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        seconds = int(HOUSEKEEPING_SECONDS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", seconds, int((HOUSEKEEPING_SECONDS - seconds) * 1e6)))
        reader = _BoundedReader(sock, self)
        try:
            while not stop:
                self.metrics.epoch.set(self.schedule.current_epoch(time.time()))
                self.expire_retired_secrets()
                chain_expired = self.previous_owners.expire(time.monotonic())
                if reload:
                    reload.clear()
                    self.reload()
                if self.kernel_path is not None:
                    try:
                        if chain_expired:
                            self.kernel_path.write_maglev(self.policy)
                        self.kernel_path.refresh(self.policy, self.schedule, time.time())
                    except fastpath.FastPathError as error:  # its SYNs fall back to the queue (no_salt)
                        log("kernel_path_refresh_failed", error=str(error))
                self.housekeeping_due = time.monotonic() + HOUSEKEEPING_SECONDS
                queue.run_socket(reader)
        finally:
            sock.close()
            if self.kernel_path is not None:
                self.kernel_path.close()
            self.rules.remove(*self.protected)
            queue.unbind()
            log("front_stopped", queue=queue_num)
        return 0

    def reload(self) -> None:
        """SIGHUP: the configuration and secrets again; the queue's rules and the fast path's maps follow
        the VIPs and ports. The RESTART_KEYS keep their running values, and are reported instead."""
        try:
            self.load()
            ensure_sysctls(self.config)
            wanted = (self.config.vips, self.config.ports)
            if wanted != self.protected:
                self.rules.replace(self.protected, wanted)
                self.protected = wanted
            if self.kernel_path is not None:
                self.kernel_path.configure(self.policy, self.schedule)
        except (ConfigError, firewall.FirewallError, fastpath.FastPathError) as error:
            log("config_reload_failed", error=str(error))
            return
        pending = [key for key, running, wanted in zip(RESTART_KEYS, self.running, restart_settings(self.config))
                   if running != wanted]
        self.metrics.restart_required.set(1 if pending else 0)
        if pending:
            log("restart_required", keys=pending, source=str(self.config.source),
                note="the rest of the configuration is applied; these keys keep their running values")
        else:
            log("config_reloaded", source=str(self.config.source), secrets_accepted=len(self.schedule.secrets))


def restart_settings(config: Config) -> tuple:
    """The values of RESTART_KEYS, in that order."""
    front = config.front
    return front.queue_num, front.metrics_address, front.data_plane, front.interfaces, front.xdp_mode


def main(args: argparse.Namespace) -> int:
    return Front(args.config).run()
