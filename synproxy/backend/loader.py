"""`synproxy backend`: build, load, attach and feed bpf/backend.bpf.c (and its XDP stage,
bpf/backend_xdp.bpf.c) on a backend's interface.

The program needs, in its maps: the encap port and server window scale, the trusted front addresses,
the protected VIPs and ports, the encapsulation's MAC keys, the salts of the accepted epochs and
the next (kept current from the same master secret the fronts use), and the clock it judges their
epochs by (period, skew, the wall clock's offset from TAI). The loader stays running to keep the
salts current; on SIGTERM/SIGINT it detaches. `--stats` and `--detach` find a running program
through its tc filter and the program's map ids, so they work from any process: maps pinned in
bpffs would not, because `ip netns exec` mounts a fresh /sys (and with it an empty bpffs) for
every command.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import signal
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from pyroute2.netlink.exceptions import NetlinkError

from synproxy import firewall, health, instance
from synproxy.backend.timewait import TimeWaitRecycler
from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfError,
    BpfObject,
    Map,
    kernel_has_function,
    program_id,
    program_maps,
    program_name,
    tc_attach,
    tc_attached_program,
    tc_detach,
    xdp_attach,
    xdp_attached_program,
    xdp_detach,
    xdp_detach_id,
)
from synproxy.bpf.loading import (
    COUNTER,
    MAP_KEY,
    PORT_KEY,
    SALT_SLOT,
    SaltMap,
    SetupError,
    build_object,
    clock_offset_ns,
    counter_total,
    interface_index,
    mapped,
    per_cpu_token_bucket,
    replace_keys,
    sized_map,
)
from synproxy.config import UNKNOWN_FLOW_RESETS_PER_SECOND, ConfigError, load_config, log_warnings
from synproxy.encap import encap_key
from synproxy.logs import log
from synproxy.netlink import enable_gro
from synproxy.salt import EPOCH_SLOTS, MAX_SECRETS, SaltSchedule, SecretRotation, epoch_at
from synproxy.systemd import Notifier
from synproxy.tfo import TFO_SERVER_ENABLE, fastopen_keys, sysctl_key_value

PROGRAM = "synproxy_backend"
TC_HANDLE = TC_PRIORITY = 0x5350  # "SP": a fixed filter slot, so a later run or --detach finds it
KFUNC = "bpf_sk_assign_tcp_reqsk"
KFUNC_ERRNO_SLOTS = 64
SALT_CHECK_SECONDS = 0.25  # how often the salts are refreshed (the next epoch's is written ahead)
# enum counter in bpf/synproxy.h, in order.
COUNTERS = ("passed", "decapsulated", "untrusted", "malformed", "cookie_bad", "no_socket", "not_listener",
            "created", "kfunc_failed", "syn_received", "encap_bad_mac", "encap_refused", "listen_overflow",
            "no_flow_reset", "no_flow_dropped", "chained", "chain_failed", "icmp_passed", "time_wait_recycled",
            "time_wait_refused", "time_wait_unreported", "fastopen_passed", "request_recycled",
            "connection_recycled")
# The XDP stage (bpf/backend_xdp.bpf.c): enum backend_xdp_counter, in order, and the tc program's maps it
# reads, handed to it by fd.
XDP_PROGRAM = "synproxy_backend_xdp"
XDP_COUNTERS = ("decapsulated", "flagged", "left", "no_flow_dropped", "no_flow_reset")
XDP_SHARED_MAPS = ("config", "trusted_fronts", "encap_keys", "protected_vips", "protected_ports", "salts",
                   "reset_budget")
_CONFIG = struct.Struct("=QQqHBxIQQ")     # struct backend_config
ENCAP_KEYS = struct.Struct("<I4x16s16s")  # struct encap_keys


class BackendError(SetupError):
    """A problem of the backend's the operator must fix, phrased for them."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise BackendError("the backend must run as root (it loads BPF programs and attaches to tc)")


def check_kernel() -> None:
    """Refuse early, in one line, on a kernel that cannot run the program."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise BackendError("this kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF is needed")
    try:
        known = kernel_has_function(KFUNC)
    except BpfError as error:
        raise BackendError(error.strerror) from None
    if not known:
        raise BackendError(f"this kernel lacks the kfunc {KFUNC} (Linux 6.9 or later is needed)")


# The configuration keys that tell the fronts which client options to answer; each backend sysctl is
# net.ipv4.tcp_<key>.
OPTION_KEYS = ("sack", "ecn", "timestamps", "window_scaling")


def ensure_sysctls(answered: Iterable[str] = OPTION_KEYS) -> None:
    """The kernel ignores an assigned request socket unless tcp_syncookies is 1 or 2 (2 is kept). And a
    warning for each option the fronts answer (``answered``: the OPTION_KEYS configured true) that this
    backend's stack has off: none for one the configuration already turned off, as the warning asks."""
    path = Path("/proc/sys/net/ipv4/tcp_syncookies")
    if path.read_text().strip() == "0":
        try:
            path.write_text("1")
        except OSError as error:
            raise BackendError(f"net.ipv4.tcp_syncookies is 0 and cannot be set here ({error.strerror}): "
                               "set it to 1 (a container needs it in its sysctls)") from None
        log("sysctl_set", key="net.ipv4.tcp_syncookies", value=1)
    for key in answered:
        if Path("/proc/sys/net/ipv4", f"tcp_{key}").read_text().strip() == "0":
            log("sysctl_warning", key=f"net.ipv4.tcp_{key}", value=0,
                note=("clients the fronts answer with ECN get none from this backend" if key == "ecn" else
                      "the kernel refuses connections whose cookie or ACK asks for this option")
                + f" (set {key}: false)")


def install_fastopen_keys(secret: bytes, period: float, now: float) -> bool:
    """The farm's TCP Fast Open keys for ``now`` (primary, backup: docs/cookie.md) in this network
    namespace's net.ipv4.tcp_fastopen_key, and TFO allowed for server use; True when it wrote them.

    The namespace-wide key rather than a listener's TCP_FASTOPEN_KEY: the listeners are the
    application's sockets, not ours, and every TFO listener without a key of its own uses this one
    (docs/backend.md). Compared with the kernel's value each time, so a key someone else wrote is
    replaced within one refresh.
    """
    wanted = sysctl_key_value(fastopen_keys(secret, now, period))
    keys, mode = Path("/proc/sys/net/ipv4/tcp_fastopen_key"), Path("/proc/sys/net/ipv4/tcp_fastopen")
    try:
        if keys.read_text().strip() == wanted:
            return False
        enabled = int(mode.read_text())
        if not enabled & TFO_SERVER_ENABLE:
            mode.write_text(str(enabled | TFO_SERVER_ENABLE))
            log("sysctl_set", key="net.ipv4.tcp_fastopen", value=enabled | TFO_SERVER_ENABLE)
        keys.write_text(wanted)
    except OSError as error:
        raise BackendError(f"cannot install the TCP Fast Open keys in net.ipv4.tcp_fastopen_key ({error.strerror}): "
                           "tfo.enabled needs a writable /proc/sys/net") from None
    log("tfo_keys_installed", key_period=epoch_at(now, period))
    return True


def encap_keys_value(schedule: SaltSchedule) -> bytes:
    """The `encap_keys` element: the encap keys of the accepted secrets (at most two, the minting one
    first), as salt_slots() orders the salts."""
    keys = [encap_key(secret) for secret in schedule.secrets[:MAX_SECRETS]]
    return ENCAP_KEYS.pack(len(keys), *keys, *[bytes(16)] * (MAX_SECRETS - len(keys)))


def held_epochs(schedule: SaltSchedule, now: float) -> range:
    """The epochs a backend's map holds: the accepted ones and the next, so a handshake minted just past
    an epoch boundary finds its salt however late the loader's refresh (the program's clock decides
    when it is accepted). The next is left out while its slot still serves the oldest accepted epoch:
    with a skew above half the period the window spans four epochs near each boundary."""
    accepted = schedule.accepted_epochs(now)
    return range(accepted.start, min(accepted.stop + 1, accepted.start + EPOCH_SLOTS))


class DataPlane:
    """The loaded (not yet attached) program and its maps."""

    def __init__(self, object_path: Path):
        self.object = BpfObject(object_path)
        self._settings = (0, 0)      # encap port, server window scale
        self._reset_budget = (0, 0)  # reset_cost_ns, reset_credit_ns
        self._clock = (0, 0)         # period, skew (ns)
        self._config_written = b""
        self.xdp: XdpStage | None = None  # attached() sets it where native XDP works
        try:
            self.prog_fd = self.object.program_fd(PROGRAM)
            self.config = self._map("config", _CONFIG.size)
            self.trusted_fronts = self._map("trusted_fronts", 1)
            self.protected_vips = self._map("protected_vips", 1)
            self.protected_ports = self._map("protected_ports", 1)
            self.encap_keys = self._map("encap_keys", ENCAP_KEYS.size)
            self.salts = SaltMap(self._map("salts", SALT_SLOT.size))
            self.counters = self._map("counters", COUNTER.size)
            self.kfunc_errors = self._map("kfunc_errors", COUNTER.size)
            self.time_wait = self.object.map("time_wait")  # a ring buffer: timewait.TimeWaitRecycler reads it
            self._encap_keys_written = b""
        except BaseException:
            self.object.close()
            raise

    def _map(self, name: str, value_size: int) -> Map:
        return sized_map(self.object, name, value_size)

    def configure(self, encap_port: int, server_wscale: int,
                  unknown_flow_resets_per_second: int = UNKNOWN_FLOW_RESETS_PER_SECOND) -> None:
        self._settings = (encap_port, server_wscale)
        self._reset_budget = per_cpu_token_bucket(unknown_flow_resets_per_second, os.cpu_count() or 1)
        self._write_config()

    def _write_config(self) -> None:
        """The settings, the program's clock (the epoch window and the wall clock's offset from
        CLOCK_TAI, read again at every write: it changes only when the kernel's TAI offset is set), the
        CPU count (online CPUs: a margin of all possible ones could exceed a small backlog) and the
        reset budget shared between them."""
        value = _CONFIG.pack(*self._clock, clock_offset_ns(), *self._settings, os.cpu_count() or 1,
                             *self._reset_budget)
        if value != self._config_written:
            self.config.update(MAP_KEY.pack(0), value)
            self._config_written = value

    def trust(self, fronts: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        replace_keys(self.trusted_fronts, {mapped(front) for front in fronts})

    def protect(self, vips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], ports: Iterable[int]) -> None:
        """The VIPs and ports the program accepts encapsulated segments to (and whose plain SYNs count as
        having bypassed the fronts)."""
        replace_keys(self.protected_vips, {mapped(vip) for vip in vips})
        replace_keys(self.protected_ports, {PORT_KEY.pack(port) for port in ports})

    def refresh_encap_keys(self, schedule: SaltSchedule) -> None:
        """The accepted secrets' encap keys, as one hash-map element: an update replaces it whole."""
        value = encap_keys_value(schedule)
        if value != self._encap_keys_written:
            self.encap_keys.update(MAP_KEY.pack(0), value)
            self._encap_keys_written = value

    def refresh_salts(self, schedule: SaltSchedule, now: float) -> None:
        """The salts of the accepted epochs and the next one, and the window the program judges them by."""
        self.salts.refresh(schedule, held_epochs(schedule, now))
        self._clock = (round(schedule.period * 1e9), round(schedule.skew * 1e9))
        self._write_config()

    def close(self) -> None:
        self.object.close()


def read_counters(counters: Map, kfunc_errors: Map) -> dict:
    """Per-CPU counters summed, by name; kfunc failures under "kfunc_errors" by errno name.

    The 64 errno slots are read only when some kfunc call failed (each failure counts in both maps).
    """
    totals: dict = {name: counter_total(counters, index) for index, name in enumerate(COUNTERS)}
    totals["kfunc_errors"] = {}
    if totals["kfunc_failed"]:
        totals["kfunc_errors"] = {errno.errorcode.get(code, str(code)): value for code in range(KFUNC_ERRNO_SLOTS)
                                  if (value := counter_total(kfunc_errors, code))}
    return totals


def read_xdp_counters(counters: Map) -> dict:
    """The XDP stage's per-CPU counters summed, by name."""
    return {name: counter_total(counters, index) for index, name in enumerate(XDP_COUNTERS)}


def read_stats(interface: str) -> dict:
    """The counters of the program attached to ``interface`` (in this network namespace), and the XDP
    stage's under "xdp" when it is attached."""
    ifindex = interface_index(interface)
    prog_id = tc_attached_program(ifindex, TC_HANDLE, TC_PRIORITY)
    if not prog_id:
        raise BackendError(f"no synproxy backend program is attached to {interface}")
    maps = program_maps(prog_id)
    try:
        totals = read_counters(maps["counters"], maps["kfunc_errors"])
    finally:
        for found in maps.values():
            os.close(found.fd)
    xdp_id = leftover_xdp(ifindex)
    if xdp_id:
        maps = program_maps(xdp_id)
        try:
            totals["xdp"] = read_xdp_counters(maps["xdp_counters"])
        finally:
            for found in maps.values():
                os.close(found.fd)
    return totals


def leftover_xdp(ifindex: int) -> int | None:
    """The id of the XDP stage attached to the interface, or None; only one backend runs per namespace
    (synproxy/instance.py), so a program of our name there is ours or a dead backend's."""
    attached = xdp_attached_program(ifindex)
    if attached is None or attached[1] != XDP_FLAGS_DRV_MODE or program_name(attached[0]) != XDP_PROGRAM[:15]:
        return None
    return attached[0]


def detach(interface: str) -> bool:
    """Remove the programs from ``interface`` (also after a crash); False when none was attached."""
    ifindex = interface_index(interface)
    xdp_id = leftover_xdp(ifindex)
    if xdp_id:
        xdp_detach_id(ifindex, XDP_FLAGS_DRV_MODE, xdp_id)
    return tc_detach(ifindex, TC_HANDLE, TC_PRIORITY) or bool(xdp_id)


class XdpStage:
    """bpf/backend_xdp.bpf.c loaded over the tc program's maps (nothing of its own to fill but counters)."""

    def __init__(self, plane: DataPlane):
        self.object = BpfObject(build_object("backend_xdp"),
                                {name: plane.object.map(name) for name in XDP_SHARED_MAPS})
        try:
            self.prog_fd = self.object.program_fd(XDP_PROGRAM)
            self.counters = sized_map(self.object, "xdp_counters", COUNTER.size)
        except BaseException:
            self.object.close()
            raise

    def close(self) -> None:
        self.object.close()


@contextlib.contextmanager
def xdp_stage(plane: DataPlane, interface: str, ifindex: int) -> Iterator[XdpStage | None]:
    """The XDP stage attached in native mode to ``interface`` (a dead backend's first removed), detached on
    exit; None where the driver has no native XDP or another XDP program holds the interface: the tc
    program alone then does all (docs/backend.md). Generic XDP would run after GRO, too late to help."""
    try:
        left = leftover_xdp(ifindex)
        if left:
            xdp_detach_id(ifindex, XDP_FLAGS_DRV_MODE, left)
            log("xdp_leftover_detached", interface=interface, program_id=left)
    except BpfError as error:
        raise BackendError(f"removing the XDP program a previous backend left on {interface} failed: "
                           f"{error.strerror}") from None
    try:
        stage = XdpStage(plane)
    except (BpfError, SetupError) as error:
        log("backend_xdp_unavailable", interface=interface, error=str(error), note="the tc program alone decides")
        yield None
        return
    try:
        try:
            xdp_attach(ifindex, stage.prog_fd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except BpfError as error:
            log("backend_xdp_unavailable", interface=interface, error=error.strerror,
                note="the tc program alone decides")
            yield None
            return
        log("backend_xdp_attached", interface=interface, mode="native")
        try:
            if enable_gro(interface):  # what the stage is for: a veth's is off by default
                log("interface_gro_enabled", interface=interface)
        except (OSError, NetlinkError, KeyError) as error:
            log("interface_gro_unchanged", interface=interface, error=str(error),
                note="the XDP stage decapsulates, but nothing coalesces what it passes")
        try:
            yield stage
        finally:
            xdp_detach(ifindex, XDP_FLAGS_DRV_MODE, stage.prog_fd)
    finally:
        stage.close()


@contextlib.contextmanager
def attached(interface: str, fronts: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
             vips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], ports: Iterable[int], encap_port: int,
             server_wscale: int, schedule: SaltSchedule,
             unknown_flow_resets_per_second: int = UNKNOWN_FLOW_RESETS_PER_SECOND,
             answered: Iterable[str] = OPTION_KEYS) -> Iterator[DataPlane]:
    """The program built, loaded, filled and attached to ``interface``'s tc ingress; detached on exit."""
    fronts = tuple(fronts)
    check_kernel()
    ifindex = interface_index(interface)
    object_path = build_object("backend")
    try:
        plane = DataPlane(object_path)
    except BpfError as error:
        raise BackendError(f"loading the BPF program failed: {error.strerror}") from None
    try:
        ensure_sysctls(answered)
        plane.configure(encap_port, server_wscale, unknown_flow_resets_per_second)
        plane.trust(fronts)
        plane.protect(vips, ports)
        plane.refresh_encap_keys(schedule)
        plane.refresh_salts(schedule, time.time())
        # Also at the loopback device's ingress: the TIME_WAIT recycler re-injects segments there
        # (timewait.py); the program passes the device's own traffic uncounted.
        loopback = interface_index("lo")
        tc_attach(loopback, plane.prog_fd, TC_HANDLE, TC_PRIORITY)
        try:
            tc_attach(ifindex, plane.prog_fd, TC_HANDLE, TC_PRIORITY)
            try:
                with xdp_stage(plane, interface, ifindex) as plane.xdp:
                    log("backend_attached", interface=interface, object=object_path.name, encap_port=encap_port,
                        fronts=[str(front) for front in fronts], xdp=plane.xdp is not None)
                    yield plane
            finally:
                tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
                log("backend_detached", interface=interface)
        finally:
            tc_detach(loopback, TC_HANDLE, TC_PRIORITY)
    finally:
        plane.close()


class _CountersCollector:
    """Prometheus view of the BPF counters, read at scrape time."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    def collect(self):
        totals = read_counters(self.plane.counters, self.plane.kfunc_errors)
        packets = CounterMetricFamily("synproxy_backend_packets", "Packets seen by the backend program, by outcome",
                                      labels=["outcome"])
        for name in COUNTERS:
            packets.add_metric([name], totals[name])
        yield packets
        failures = CounterMetricFamily("synproxy_backend_kfunc_failures",
                                       "bpf_sk_assign_tcp_reqsk failures, by errno", labels=["errno"])
        for name, value in totals["kfunc_errors"].items():
            failures.add_metric([name], value)
        yield failures
        if self.plane.xdp is not None:
            stage = CounterMetricFamily("synproxy_backend_xdp_packets", "Encapsulated packets the XDP stage saw, "
                                        "by outcome", labels=["outcome"])
            for name, value in read_xdp_counters(self.plane.xdp.counters).items():
                stage.add_metric([name], value)
            yield stage


# What a reload cannot change in a running backend: the interface its program is attached to, its metrics socket.
RESTART_KEYS = ("backend.interface", "backend.metrics_address")


def restart_settings(config) -> tuple:
    """The values of RESTART_KEYS, in that order."""
    return config.backend.interface, config.backend.metrics_address


def serve_metrics(address: str | None, state: health.Health) -> CollectorRegistry | None:
    """The metrics and health endpoint, started before anything is installed so a taken port is refused in
    one line."""
    if not address:
        return None
    registry = CollectorRegistry()
    try:
        health.serve(address, registry, state, "backend")
    except OSError as error:
        raise BackendError(f"cannot serve metrics on {address}: {error.strerror}") from None
    return registry


def serve(config, interface: str) -> int:
    """Run until SIGTERM/SIGINT: keep the salts current; SIGHUP reloads the configuration."""
    stop, reload, wake = [], [], threading.Event()

    def on_signal(signum, _frame) -> None:
        (reload if signum == signal.SIGHUP else stop).append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    rotation = SecretRotation()
    configured = config.salt_schedule()
    schedule = rotation.effective(configured, None, time.time())
    _warn_if_secrets_unchecked(schedule)
    state, notifier = health.Health(), Notifier()
    tfo = config.tfo.enabled  # refreshed below; off after a failure until the next reload
    if tfo:
        install_fastopen_keys(schedule.secrets[0], config.tfo.key_period_seconds, time.time())
    registry = serve_metrics(config.backend.metrics_address, state)
    running = restart_settings(config)
    untracked = firewall.backend_chain()
    untracked.install(config.vips, config.ports)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: untracked.remove(config.vips, config.ports))
        plane = cleanup.enter_context(attached(interface, config.fronts, config.vips, config.ports,
                                               config.encap_port, config.server_wscale, schedule,
                                               config.backend.unknown_flow_resets_per_second,
                                               [key for key in OPTION_KEYS if getattr(config, key)]))
        try:
            recycler = TimeWaitRecycler(plane.time_wait)
        except PermissionError as error:
            raise BackendError(str(error)) from None
        cleanup.callback(recycler.start().close)
        restart_required = reload_failures = None
        if registry is not None:
            registry.register(_CountersCollector(plane))
            restart_required = Gauge("synproxy_backend_restart_required",
                                     "1 when the configuration holds changes only a restart applies",
                                     registry=registry)
            reload_failures = health.ReloadFailures("backend", registry)
        while not stop:
            wake.wait(SALT_CHECK_SECONDS)
            wake.clear()
            if reload:
                reload.clear()
                try:
                    previous_config, config = config, load_config(config.source)
                    log_warnings(config)
                    configured = config.salt_schedule()
                    if (config.vips, config.ports) != (previous_config.vips, previous_config.ports):
                        untracked.replace((previous_config.vips, previous_config.ports), (config.vips, config.ports))
                    plane.configure(config.encap_port, config.server_wscale,
                                    config.backend.unknown_flow_resets_per_second)
                    plane.trust(config.fronts)
                    plane.protect(config.vips, config.ports)
                    tfo = config.tfo.enabled
                    pending = [key for key, was, wanted in zip(RESTART_KEYS, running, restart_settings(config))
                               if was != wanted]
                    if restart_required is not None:
                        restart_required.set(1 if pending else 0)
                    if pending:
                        log("restart_required", keys=pending, source=str(config.source),
                            note="the rest of the configuration is applied; these keys keep their running values")
                    else:
                        log("config_reloaded", source=str(config.source))
                except (ConfigError, firewall.FirewallError) as error:
                    if reload_failures is not None:
                        reload_failures.inc()
                    log("config_reload_failed", error=str(error))
            now = time.time()
            previous, schedule = schedule, rotation.effective(configured, schedule, now)
            if schedule.secrets != previous.secrets:
                _warn_if_secrets_unchecked(schedule)
            plane.refresh_encap_keys(schedule)
            plane.refresh_salts(schedule, now)
            if tfo:
                try:
                    install_fastopen_keys(schedule.secrets[0], config.tfo.key_period_seconds, now)
                except BackendError as error:
                    log("tfo_keys_failed", error=str(error), note="not retried until the next reload")
                    tfo = False
            state.beat(health_checks(plane, interface), time.monotonic())
            notifier.beat(state.summary(time.monotonic()))
        notifier.notify("STOPPING=1")
    return 0


def health_checks(plane: DataPlane, interface: str) -> dict[str, str | None]:
    """What /readyz follows (synproxy/health.py): the program still in its tc slot. The salts are current
    when the loop beats: it refreshes them (every accepted epoch and the next) just before each beat, so a
    loop that stops refreshing stops beating."""
    try:
        attached = tc_attached_program(interface_index(interface), TC_HANDLE, TC_PRIORITY)
    except (BpfError, SetupError) as error:
        attached, problem = None, str(error)
    else:
        problem = f"no program in {interface}'s tc slot" if attached is None else f"another program ({attached}) " \
                  f"in {interface}'s tc slot"
    return {"loop": None, "program": None if attached == program_id(plane.prog_fd) else problem}


def _warn_if_secrets_unchecked(schedule: SaltSchedule) -> None:
    if len(schedule.secrets) > MAX_SECRETS:
        log("secrets_unchecked", accepted=len(schedule.secrets), checked=MAX_SECRETS,
            note="the backend checks the minting and the first accepted secret only; fronts accept more")


def main(args: argparse.Namespace) -> int:
    """`synproxy backend --config FILE [--interface IF] [--detach | --stats [--json]]`."""
    config = load_config(args.config)
    if not args.stats:  # a tool's output, not a node's log (check-config says the warnings)
        log_warnings(config)
    interface = args.interface or config.backend.interface
    try:
        if not interface:
            raise BackendError("no interface: set backend.interface in the config or pass --interface")
        require_root()
        # Serving and detaching both need this namespace's backend slot: a second instance would take over
        # the tc slot and, on exit, detach the program and remove the rules the first one still relies on.
        lock = None if args.stats else instance.claim("backend")
        if args.detach:
            print(f"{interface}: {'detached' if detach(interface) else 'nothing was attached'}")
            return 0
        if args.stats:
            totals = read_stats(interface)
            if getattr(args, "json", False):
                print(json.dumps(totals))
            else:
                for name, value in totals.items():
                    print(f"{name:16} {value}")
            return 0
        with lock:
            return serve(config, interface)
    except (SetupError, BpfError, instance.AlreadyRunning) as error:  # SetupError: a BackendError too
        message = error.strerror if isinstance(error, BpfError) else str(error)
        raise SystemExit(f"synproxy backend: {message}") from None  # the CLI: a log line, or a tool's plain line
