"""The front's fast path: bpf/front.bpf.c on tc ingress answers plain SYNs before netfilter sees them.

A SYN answered through NFQUEUE costs a netlink round trip and the Python handler; the program builds
the same SYN-ACK in the kernel. The Python front stays the authority: the program answers only SYNs
it can answer byte for byte as handler.handle would and leaves every other packet to the queue
(docs/front.md). This shell builds, loads and attaches it, keeps its maps current (configuration, the
current and next epoch's salts, the wall clock's offset from CLOCK_TAI), and reads its counters.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from synproxy.backend.libbpf import BpfError, BpfObject, tc_attach, tc_detach
from synproxy.backend.loader import (
    COUNTER,
    MAP_KEY,
    PORT_KEY,
    SALT_SLOT,
    BackendError,
    SaltMap,
    build_object,
    clock_offset_ns,
    counter_total,
    interface_index,
    mapped,
    replace_keys,
    sized_map,
)
from synproxy.config import Config
from synproxy.front.handler import FrontPolicy
from synproxy.salt import SaltSchedule

PROGRAM = "synproxy_front"
TC_HANDLE = TC_PRIORITY = 0x5346  # "SF": the backend program uses "SP", so one node can run both
# enum front_counter in bpf/synproxy.h, in order; each counted per IP version.
OUTCOMES = ("not_protected", "queued", "unverified", "no_salt", "syn_answered", "unrouted", "unsent")
FAMILIES = (4, 6)
_CONFIG = struct.Struct("=Qq2HBBBx")  # struct front_config


class FastPathError(RuntimeError):
    """The fast path cannot run as configured; phrased for the operator."""


class FastPath:
    """The loaded program and its maps; attached to interfaces by attach(), all detached by close()."""

    def __init__(self, object_path: Path):
        self.object = BpfObject(object_path)
        try:
            self.prog_fd = self.object.program_fd(PROGRAM)
            self.config = sized_map(self.object, "config", _CONFIG.size)
            self.protected_vips = sized_map(self.object, "protected_vips", 1)
            self.protected_ports = sized_map(self.object, "protected_ports", 1)
            self.salts = SaltMap(sized_map(self.object, "salts", SALT_SLOT.size))
            self.counters = sized_map(self.object, "counters", COUNTER.size)
        except BaseException:
            self.object.close()
            raise
        self.attached: list[int] = []
        self._config_written = b""

    def configure(self, policy: FrontPolicy, schedule: SaltSchedule) -> None:
        """What the program protects and announces, then the salts and the clock (refresh())."""
        for what, wanted, flag_map in (("VIPs", policy.vips, self.protected_vips),
                                       ("ports", policy.ports, self.protected_ports)):
            if len(wanted) > flag_map.max_entries:
                raise FastPathError(f"{len(wanted)} {what}: the fast path holds at most {flag_map.max_entries}")
        try:
            replace_keys(self.protected_vips, {mapped(ipaddress.ip_address(vip)) for vip in policy.vips})
            replace_keys(self.protected_ports, {PORT_KEY.pack(port) for port in policy.ports})
        except BpfError as error:
            raise FastPathError(f"filling the fast path's maps failed: {error.strerror}") from None
        self.refresh(policy, schedule, time.time())

    def refresh(self, policy: FrontPolicy, schedule: SaltSchedule, now: float) -> None:
        """At every housekeeping: the salts of the current and the next epoch (a SYN arriving just past
        an epoch boundary finds its salt), and the configuration when it changed."""
        epoch = schedule.current_epoch(now)
        value = _CONFIG.pack(round(schedule.period * 1e9), clock_offset_ns(), policy.announced_mss(4),
                             policy.announced_mss(6), policy.server_wscale, policy.sack, policy.ecn)
        try:
            self.salts.refresh(schedule, (epoch, epoch + 1))
            if value != self._config_written:
                self.config.update(MAP_KEY.pack(0), value)
                self._config_written = value
        except BpfError as error:
            raise FastPathError(f"updating the fast path's maps failed: {error.strerror}") from None

    def attach(self, interfaces: Iterable[str]) -> None:
        for name in interfaces:
            try:
                ifindex = interface_index(name)
            except BackendError as error:
                raise FastPathError(f"front.fast_path_interfaces: {error}") from None
            try:
                tc_attach(ifindex, self.prog_fd, TC_HANDLE, TC_PRIORITY)
            except BpfError as error:
                raise FastPathError(f"attaching to {name}'s tc ingress failed: {error.strerror}") from None
            self.attached.append(ifindex)

    def counts(self) -> dict[tuple[str, int], int]:
        """The per-CPU counters summed, by (outcome, IP version)."""
        totals = {}
        for index, outcome in enumerate(OUTCOMES):
            for offset, family in enumerate(FAMILIES):
                totals[outcome, family] = counter_total(self.counters, index * 2 + offset)
        return totals

    def close(self) -> None:
        for ifindex in self.attached:
            try:
                tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
            except BpfError:
                pass  # the interface went away, and the filter with it
        self.attached.clear()
        self.object.close()


def start(config: Config, policy: FrontPolicy, schedule: SaltSchedule) -> FastPath:
    """Build, load, fill and attach the program on the configured interfaces."""
    try:
        fast_path = FastPath(build_object("front"))
    except BackendError as error:
        raise FastPathError(str(error)) from None
    except BpfError as error:
        raise FastPathError(f"loading bpf/front.bpf.c failed: {error.strerror}") from None
    try:
        fast_path.configure(policy, schedule)
        fast_path.attach(config.front.fast_path_interfaces)
    except BaseException:
        fast_path.close()
        raise
    return fast_path
