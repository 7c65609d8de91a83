"""`synproxy backend`: build, load, attach and feed bpf/backend.bpf.c on a backend's interface.

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
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

from synproxy import firewall
from synproxy.backend.libbpf import (
    BpfError,
    BpfObject,
    Map,
    kernel_has_function,
    program_maps,
    tc_attach,
    tc_attached_program,
    tc_detach,
)
from synproxy.config import UNKNOWN_FLOW_RESETS_PER_SECOND, ConfigError, load_config, log_warnings
from synproxy.encap import encap_key
from synproxy.logs import log
from synproxy.salt import EPOCH_SLOTS, MAX_SECRETS, SaltSchedule, SecretRotation

REPO_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SHARED_HEADER = "synproxy.h"
PROGRAM = "synproxy_backend"
TC_HANDLE = TC_PRIORITY = 0x5350  # "SP": a fixed filter slot, so a later run or --detach finds it
KFUNC = "bpf_sk_assign_tcp_reqsk"
KFUNC_ERRNO_SLOTS = 64
SALT_CHECK_SECONDS = 0.25  # how often the salts are refreshed (the next epoch's is written ahead)
# enum counter in bpf/synproxy.h, in order.
COUNTERS = ("passed", "decapsulated", "untrusted", "malformed", "cookie_bad", "no_socket", "not_listener",
            "created", "kfunc_failed", "syn_received", "encap_bad_mac", "encap_refused", "listen_overflow",
            "no_flow_reset", "no_flow_dropped")
_CONFIG = struct.Struct("=QQqHBxIQQ")     # struct backend_config
SALT_SLOT = struct.Struct("<IIQ16s16s")   # struct salt_slot
ENCAP_KEYS = struct.Struct("<I4x16s16s")  # struct encap_keys
PORT_KEY = struct.Struct("=H")  # protected_ports key: host order
MAP_KEY = struct.Struct("<I")   # array map index
COUNTER = struct.Struct("<Q")   # one CPU's value in a per-CPU counter map
NS_PER_SECOND = 1_000_000_000


class BackendError(RuntimeError):
    """A problem the operator must fix, phrased for them."""


def bpf_dir() -> Path:
    return Path(os.environ.get("SYNPROXY_BPF_DIR", REPO_BPF_DIR))


def _clang() -> str:
    for name in ("clang-19", "clang"):
        if path := shutil.which(name):
            return path
    raise BackendError("clang not found: install clang-19 (it builds the BPF program)")


def build_object(program: str = "backend") -> Path:
    """Compile bpf/<program>.bpf.c unless an object of the same sources and flags exists; return its path.

    Objects live in <bpf dir>/build (or $SYNPROXY_BUILD_DIR) under a hash of the sources and flags, so a
    host without a compiler (the lab's image) runs an object built elsewhere; clang is needed only to build.
    """
    source_dir = bpf_dir()
    flags = ["-O2", "-g", "-Wall", "-target", "bpf", "-D__TARGET_ARCH_x86",
             f"-I/usr/include/{os.uname().machine}-linux-gnu"]
    digest = hashlib.sha256(" ".join(flags).encode())
    source = f"{program}.bpf.c"
    for name in (source, SHARED_HEADER):
        try:
            digest.update((source_dir / name).read_bytes())
        except OSError as error:
            raise BackendError(f"BPF source {source_dir / name}: {error.strerror}") from None
    build_dir = Path(os.environ.get("SYNPROXY_BUILD_DIR", source_dir / "build"))
    target = build_dir / f"{program}-{digest.hexdigest()[:16]}.bpf.o"
    if target.exists():
        return target
    clang = _clang()
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".o", delete=False) as partial:
        pass
    done = subprocess.run([clang, *flags, f"-I{source_dir}", "-c", str(source_dir / source), "-o",
                           partial.name],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        os.unlink(partial.name)
        raise BackendError(f"building the BPF program failed:\n{done.stderr.strip()}")
    os.replace(partial.name, target)  # atomic: backends starting together may both build
    return target


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


def ensure_sysctls() -> None:
    """The kernel ignores an assigned request socket unless tcp_syncookies is 1 or 2 (2 is kept)."""
    path = Path("/proc/sys/net/ipv4/tcp_syncookies")
    if path.read_text().strip() == "0":
        try:
            path.write_text("1")
        except OSError as error:
            raise BackendError(f"net.ipv4.tcp_syncookies is 0 and cannot be set here ({error.strerror}): "
                               "set it to 1 (a container needs it in its sysctls)") from None
        log("sysctl_set", key="net.ipv4.tcp_syncookies", value=1)
    for name in ("tcp_sack", "tcp_timestamps", "tcp_window_scaling"):
        if Path("/proc/sys/net/ipv4", name).read_text().strip() == "0":
            log("sysctl_warning", key=f"net.ipv4.{name}", value=0,
                note="the kernel refuses connections whose cookie or ACK asks for this option")


def mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte form the program keys on: IPv4 as ::ffff:a.b.c.d."""
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}").packed
    return address.packed


def clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_TAI, to the millisecond: the programs have only the TAI clock, the salt
    epochs follow the wall clock. Whole seconds in practice; reading the two clocks apart adds µs."""
    return round((time.time_ns() - time.clock_gettime_ns(time.CLOCK_TAI)) / 1e6) * 1_000_000


def salt_slots(schedule: SaltSchedule, epochs: Iterable[int]) -> dict[int, bytes]:
    """A `salts` map's slots (epoch mod 4) for these epochs: their salts (at most two secrets, the
    minting one first). At most four consecutive epochs, so no two share a slot; other slots are absent."""
    slots = {}
    for epoch in epochs:
        keys = schedule.validating_salts(epoch)[:MAX_SECRETS]
        nkeys = len(keys)
        keys += [bytes(16)] * (MAX_SECRETS - nkeys)
        slots[epoch % EPOCH_SLOTS] = SALT_SLOT.pack(1, nkeys, epoch, *keys)
    return slots


def encap_keys_value(schedule: SaltSchedule) -> bytes:
    """The `encap_keys` element: the encap keys of the accepted secrets (at most two, the minting one
    first), as salt_slots() orders the salts."""
    keys = [encap_key(secret) for secret in schedule.secrets[:MAX_SECRETS]]
    return ENCAP_KEYS.pack(len(keys), *keys, *[bytes(16)] * (MAX_SECRETS - len(keys)))


def sized_map(bpf_object: BpfObject, name: str, value_size: int) -> Map:
    """A map of a loaded object, refused when its values are not the size the loader packs."""
    found = bpf_object.map(name)
    if found.value_size != value_size:
        raise BackendError(f"map {name!r} holds {found.value_size}-byte values, the loader packs "
                           f"{value_size}: bpf/synproxy.h and the loader disagree")
    return found


def held_epochs(schedule: SaltSchedule, now: float) -> range:
    """The epochs a backend's map holds: the accepted ones and the next, so a handshake minted just past
    an epoch boundary finds its salt however late the loader's refresh (the program's clock decides
    when it is accepted). The next is left out while its slot still serves the oldest accepted epoch:
    with a skew above half the period the window spans four epochs near each boundary."""
    accepted = schedule.accepted_epochs(now)
    return range(accepted.start, min(accepted.stop + 1, accepted.start + EPOCH_SLOTS))


class SaltMap:
    """A program's `salts` hash map, rewritten slot by slot only where a slot changed. An update
    replaces the element, so readers see the old value or the new, never a mix; a slot no epoch uses
    is deleted."""

    def __init__(self, salt_map: Map):
        self.map = salt_map
        self._written: dict[int, bytes | None] = {}

    def refresh(self, schedule: SaltSchedule, epochs: Iterable[int]) -> None:
        wanted = salt_slots(schedule, epochs)
        for slot in range(EPOCH_SLOTS):
            value = wanted.get(slot)
            if slot in self._written and self._written[slot] == value:
                continue
            if value is None:
                self.map.delete(MAP_KEY.pack(slot))
            else:
                self.map.update(MAP_KEY.pack(slot), value)
            self._written[slot] = value


def replace_keys(flag_map: Map, wanted: set[bytes]) -> None:
    """Make a map of flags (key -> 1) hold exactly the keys ``wanted``."""
    for key in set(flag_map.keys()) - wanted:
        flag_map.delete(key)
    for key in wanted:
        flag_map.update(key, b"\x01")


def reset_budget(resets_per_second: int, cpus: int) -> tuple[int, int]:
    """The program's per-CPU token bucket (reset_cost_ns, reset_credit_ns) for a backend-wide rate of
    resets to packets of no connection, with a burst of one second's worth: each CPU gets its share of
    both, and holds at least one reset. A rate of 0 passes none."""
    if not resets_per_second:
        return 0, 0
    cost_ns = NS_PER_SECOND * cpus // resets_per_second
    return cost_ns, max(NS_PER_SECOND, cost_ns)


class DataPlane:
    """The loaded (not yet attached) program and its maps."""

    def __init__(self, object_path: Path):
        self.object = BpfObject(object_path)
        self._settings = (0, 0)      # encap port, server window scale
        self._reset_budget = (0, 0)  # reset_cost_ns, reset_credit_ns
        self._clock = (0, 0)         # period, skew (ns)
        self._config_written = b""
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
            self._encap_keys_written = b""
        except BaseException:
            self.object.close()
            raise

    def _map(self, name: str, value_size: int) -> Map:
        return sized_map(self.object, name, value_size)

    def configure(self, encap_port: int, server_wscale: int,
                  unknown_flow_resets_per_second: int = UNKNOWN_FLOW_RESETS_PER_SECOND) -> None:
        self._settings = (encap_port, server_wscale)
        self._reset_budget = reset_budget(unknown_flow_resets_per_second, os.cpu_count() or 1)
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


def counter_total(counter_map: Map, index: int) -> int:
    """One slot of a per-CPU counter map, summed over the CPUs."""
    return sum(COUNTER.unpack(value)[0] for value in counter_map.lookup(MAP_KEY.pack(index)))


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


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise BackendError(f"no network interface {name!r} here") from None


def read_stats(interface: str) -> dict:
    """The counters of the program attached to ``interface`` (in this network namespace)."""
    prog_id = tc_attached_program(interface_index(interface), TC_HANDLE, TC_PRIORITY)
    if not prog_id:
        raise BackendError(f"no synproxy backend program is attached to {interface}")
    maps = program_maps(prog_id)
    try:
        return read_counters(maps["counters"], maps["kfunc_errors"])
    finally:
        for found in maps.values():
            os.close(found.fd)


def detach(interface: str) -> bool:
    """Remove the program from ``interface`` (also after a crash); False when none was attached."""
    return tc_detach(interface_index(interface), TC_HANDLE, TC_PRIORITY)


@contextlib.contextmanager
def attached(interface: str, fronts: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
             vips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], ports: Iterable[int], encap_port: int,
             server_wscale: int, schedule: SaltSchedule,
             unknown_flow_resets_per_second: int = UNKNOWN_FLOW_RESETS_PER_SECOND) -> Iterator[DataPlane]:
    """The program built, loaded, filled and attached to ``interface``'s tc ingress; detached on exit."""
    fronts = tuple(fronts)
    check_kernel()
    ifindex = interface_index(interface)
    object_path = build_object()
    try:
        plane = DataPlane(object_path)
    except BpfError as error:
        raise BackendError(f"loading the BPF program failed: {error.strerror}") from None
    try:
        ensure_sysctls()
        plane.configure(encap_port, server_wscale, unknown_flow_resets_per_second)
        plane.trust(fronts)
        plane.protect(vips, ports)
        plane.refresh_encap_keys(schedule)
        plane.refresh_salts(schedule, time.time())
        tc_attach(ifindex, plane.prog_fd, TC_HANDLE, TC_PRIORITY)
        try:
            log("backend_attached", interface=interface, object=object_path.name, encap_port=encap_port,
                fronts=[str(front) for front in fronts])
            yield plane
        finally:
            tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
            log("backend_detached", interface=interface)
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
    untracked = firewall.backend_chain()
    untracked.install(config.vips, config.ports)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: untracked.remove(config.vips, config.ports))
        plane = cleanup.enter_context(attached(interface, config.fronts, config.vips, config.ports,
                                               config.encap_port, config.server_wscale, schedule,
                                               config.backend.unknown_flow_resets_per_second))
        if config.backend.metrics_address:
            registry = CollectorRegistry()
            registry.register(_CountersCollector(plane))
            host, _, port = config.backend.metrics_address.rpartition(":")
            start_http_server(int(port), host.strip("[]"), registry=registry)
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
                        untracked.remove(previous_config.vips, previous_config.ports)
                        untracked.install(config.vips, config.ports)
                    plane.configure(config.encap_port, config.server_wscale,
                                    config.backend.unknown_flow_resets_per_second)
                    plane.trust(config.fronts)
                    plane.protect(config.vips, config.ports)
                    log("config_reloaded", source=str(config.source))
                except ConfigError as error:
                    log("config_reload_failed", error=str(error))
            now = time.time()
            previous, schedule = schedule, rotation.effective(configured, schedule, now)
            if schedule.secrets != previous.secrets:
                _warn_if_secrets_unchecked(schedule)
            plane.refresh_encap_keys(schedule)
            plane.refresh_salts(schedule, now)
    return 0


def _warn_if_secrets_unchecked(schedule: SaltSchedule) -> None:
    if len(schedule.secrets) > MAX_SECRETS:
        log("secrets_unchecked", accepted=len(schedule.secrets), checked=MAX_SECRETS,
            note="the backend checks the minting and the first accepted secret only; fronts accept more")


def main(args: argparse.Namespace) -> int:
    """`synproxy backend --config FILE [--interface IF] [--detach | --stats [--json]]`."""
    config = load_config(args.config)
    log_warnings(config)
    interface = args.interface or config.backend.interface
    try:
        if not interface:
            raise BackendError("no interface: set backend.interface in the config or pass --interface")
        require_root()
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
        return serve(config, interface)
    except (BackendError, BpfError) as error:
        message = error.strerror if isinstance(error, BpfError) else str(error)
        print(f"synproxy backend: {message}", file=sys.stderr)
        return 1
