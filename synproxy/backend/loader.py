"""`synproxy backend`: build, load, attach and feed bpf/backend.bpf.c on a backend's interface.

The program needs, in its maps: the encap port and server window scale, the trusted front addresses,
and the salts of the accepted epochs (refreshed every few seconds from the same master secret the
fronts use). The loader stays running to keep the salts fresh; on SIGTERM/SIGINT it detaches. It
finds a running program through tc and the program's map ids, so `--stats` and `--detach` work from
any process (no bpffs pinning, which `ip netns exec` would hide).
"""

from __future__ import annotations

import argparse
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
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

from synproxy.backend.libbpf import (
    BpfError,
    BpfObject,
    Map,
    program_maps,
    tc_attach,
    tc_attached_program,
    tc_detach,
)
from synproxy.config import ConfigError, load_config
from synproxy.logs import log
from synproxy.salt import EPOCH_SLOTS, SaltSchedule

REPO_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCES = ("backend.bpf.c", "synproxy.h")
PROGRAM = "synproxy_backend"
TC_HANDLE = 0x5350
TC_PRIORITY = 0x5350
MAX_SECRETS = 2
KFUNC = b"bpf_sk_assign_tcp_reqsk\0"
# enum counter in bpf/synproxy.h, in order.
COUNTERS = ("passed", "decapsulated", "untrusted", "malformed", "cookie_bad", "no_socket", "not_listener",
            "created", "kfunc_failed", "syn_received", "unsupported")
_CONFIG = struct.Struct("<HBx")
_SALT_SLOT = struct.Struct("<IIQ16s16s")
_KEY = struct.Struct("<I")


class BackendError(RuntimeError):
    """A problem the operator must fix, phrased for them."""


def bpf_dir() -> Path:
    return Path(os.environ.get("SYNPROXY_BPF_DIR", REPO_BPF_DIR))


def _clang() -> str:
    for name in ("clang-19", "clang"):
        if path := shutil.which(name):
            return path
    raise BackendError("clang not found: install clang-19 (it builds the BPF program)")


def build_object() -> Path:
    """Compile the program unless an object built from the same sources exists; return its path."""
    source_dir = bpf_dir()
    digest = hashlib.sha256()
    for name in SOURCES:
        try:
            digest.update((source_dir / name).read_bytes())
        except OSError as error:
            raise BackendError(f"BPF source {source_dir / name}: {error.strerror}") from None
    build_dir = Path(os.environ.get("SYNPROXY_BUILD_DIR", source_dir / "build"))
    target = build_dir / f"backend-{digest.hexdigest()[:16]}.bpf.o"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".o", delete=False) as partial:
        pass
    command = [_clang(), "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
               f"-I/usr/include/{os.uname().machine}-linux-gnu", f"-I{source_dir}", "-c",
               str(source_dir / "backend.bpf.c"), "-o", partial.name]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        os.unlink(partial.name)
        raise BackendError(f"building the BPF program failed:\n{done.stderr.strip()}")
    os.replace(partial.name, target)  # atomic: backends starting together may both build
    return target


def check_kernel() -> None:
    if os.geteuid() != 0:
        raise BackendError("the backend must run as root (it loads BPF and attaches to tc)")
    btf = Path("/sys/kernel/btf/vmlinux")
    if not btf.exists():
        raise BackendError("this kernel has no BTF (/sys/kernel/btf/vmlinux): CONFIG_DEBUG_INFO_BTF is needed")
    if KFUNC not in btf.read_bytes():
        raise BackendError("this kernel lacks the kfunc bpf_sk_assign_tcp_reqsk (Linux 6.9 or later)")


def ensure_syncookies() -> None:
    """The kernel ignores an assigned request socket unless tcp_syncookies is 1 or 2."""
    path = Path("/proc/sys/net/ipv4/tcp_syncookies")
    if path.read_text().strip() == "0":
        path.write_text("1")
        log("sysctl_set", key="net.ipv4.tcp_syncookies", value=1)
    for name in ("tcp_sack", "tcp_timestamps", "tcp_window_scaling"):
        if Path("/proc/sys/net/ipv4", name).read_text().strip() == "0":
            log("sysctl_warning", key=f"net.ipv4.{name}", value=0,
                note="the kernel refuses connections whose cookie asks for this option")


def mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte form the program keys on: IPv4 as ::ffff:a.b.c.d."""
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}").packed
    return address.packed


def salt_slots(schedule: SaltSchedule, now: float) -> dict[int, bytes]:
    """The `salts` map's four slots: the accepted epochs' salts, every other slot invalid."""
    slots = {slot: _SALT_SLOT.pack(0, 0, 0, bytes(16), bytes(16)) for slot in range(EPOCH_SLOTS)}
    for epoch in schedule.accepted_epochs(now):
        keys = schedule.validating_salts(epoch)[:MAX_SECRETS]
        keys += [bytes(16)] * (MAX_SECRETS - len(keys))
        slots[epoch % EPOCH_SLOTS] = _SALT_SLOT.pack(1, min(len(schedule.secrets), MAX_SECRETS), epoch, *keys)
    return slots


class DataPlane:
    """The loaded program and its maps."""

    def __init__(self, object_path: Path):
        self.object = BpfObject(object_path)
        self.prog_fd = self.object.program_fd(PROGRAM)
        self.config = self.object.map("config", 4, _CONFIG.size)
        self.trusted_fronts = self.object.map("trusted_fronts", 16, 1)
        self.salts = self.object.map("salts", 4, _SALT_SLOT.size)
        self.counters = self.object.map("counters", 4, 8, per_cpu=True)
        self.kfunc_errors = self.object.map("kfunc_errors", 4, 8, per_cpu=True)

    def configure(self, encap_port: int, server_wscale: int) -> None:
        self.config.update(_KEY.pack(0), _CONFIG.pack(encap_port, server_wscale))

    def trust(self, fronts) -> None:
        wanted = {mapped(address) for address in fronts}
        for key in set(self.trusted_fronts.keys()) - wanted:
            self.trusted_fronts.delete(key)
        for key in wanted:
            self.trusted_fronts.update(key, b"\x01")

    def refresh_salts(self, schedule: SaltSchedule, now: float) -> None:
        for slot, value in salt_slots(schedule, now).items():
            self.salts.update(_KEY.pack(slot), value)

    def close(self) -> None:
        self.object.close()


def read_counters(counters: Map, kfunc_errors: Map) -> dict:
    """Sum the per-CPU counters; kfunc errors by errno name."""
    totals = {name: sum(struct.unpack("<Q", v)[0] for v in counters.lookup(_KEY.pack(i)))
              for i, name in enumerate(COUNTERS)}
    errors = {}
    for code in range(64):
        value = sum(struct.unpack("<Q", v)[0] for v in kfunc_errors.lookup(_KEY.pack(code)))
        if value:
            errors[errno_name(code)] = value
    totals["kfunc_errors"] = errors
    return totals


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise BackendError(f"no network interface {name!r} here") from None


def running_stats(ifindex: int) -> dict:
    prog_id = tc_attached_program(ifindex, TC_HANDLE, TC_PRIORITY)
    if not prog_id:
        raise BackendError("no synproxy backend program is attached to this interface")
    maps = program_maps(prog_id)
    return read_counters(maps["counters"], maps["kfunc_errors"])


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


def serve(config, ifindex: int, interface: str) -> int:
    check_kernel()
    object_path = build_object()
    try:
        plane = DataPlane(object_path)
    except BpfError as error:
        raise BackendError(f"loading the BPF program failed: {error.strerror}") from None
    ensure_syncookies()
    schedule = config.salt_schedule()
    plane.configure(config.encap_port, config.server_wscale)
    plane.trust(config.fronts)
    plane.refresh_salts(schedule, time.time())
    if config.backend.metrics_address:
        registry = CollectorRegistry()
        registry.register(_CountersCollector(plane))
        host, _, port = config.backend.metrics_address.rpartition(":")
        start_http_server(int(port), host.strip("[]"), registry=registry)
    stop, reload = [], []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    signal.signal(signal.SIGHUP, lambda *_: reload.append(True))
    tc_attach(ifindex, plane.prog_fd, TC_HANDLE, TC_PRIORITY)
    log("backend_attached", interface=interface, object=object_path.name, fronts=[str(f) for f in config.fronts],
        encap_port=config.encap_port)
    try:
        refresh_every = min(5.0, schedule.period / 4)
        while not stop:
            time.sleep(min(refresh_every, 0.5))
            if reload:
                reload.clear()
                try:
                    config = load_config(config.source)
                    schedule = config.salt_schedule()
                    plane.configure(config.encap_port, config.server_wscale)
                    plane.trust(config.fronts)
                    log("config_reloaded", source=str(config.source))
                except ConfigError as error:
                    log("config_reload_failed", error=str(error))
            plane.refresh_salts(schedule, time.time())
    finally:
        tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
        plane.close()
        log("backend_detached", interface=interface)
    return 0


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    interface = args.interface or config.backend.interface
    try:
        if not interface:
            raise BackendError("no interface: set backend.interface in the config or pass --interface")
        ifindex = interface_index(interface)
        if args.detach:
            removed = tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
            print(f"{interface}: {'detached' if removed else 'nothing was attached'}")
            return 0
        if args.stats:
            totals = running_stats(ifindex)
            if args.json:
                print(json.dumps(totals))
            else:
                for name, value in totals.items():
                    print(f"{name:16} {value}")
            return 0
        return serve(config, ifindex, interface)
    except (BackendError, BpfError) as error:
        print(f"synproxy backend: {error}", file=sys.stderr)
        return 1
