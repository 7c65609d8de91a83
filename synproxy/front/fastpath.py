"""The front's kernel data plane: bpf/front.bpf.c handles every protected packet at XDP or, the fallback,
at tc ingress, before netfilter sees it; select() picks the mode front.data_plane asks for.

A packet handled through NFQUEUE costs a netlink round trip and the Python handler (~35k packets/s per
front); the programs build the same SYN-ACK and the same encapsulation in the kernel. The
Python front stays the authority: the programs handle only what they can handle byte for byte as
handler.handle would and leave every other packet to the queue (docs/front.md). This shell builds,
loads and attaches them, keeps their maps current (configuration, the salts of the epochs around the
current one, the wall clock's offset from CLOCK_TAI, the forwarding keys and the Maglev table), and
reads their counters.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfError,
    BpfObject,
    program_id,
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
    NS_PER_SECOND,
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
    replace_entries,
    sized_map,
)
from synproxy.front.handler import (
    FASTOPEN_FALLBACKS,
    FASTOPEN_PER_SOURCE_BURST,
    FASTOPEN_PER_SOURCE_RATE,
    ICMP_ERRORS_PER_SECOND,
    FrontPolicy,
)
from synproxy.front.routes_back import PROOFS_SIZE, Proof, RouteWatch
from synproxy.logs import log
from synproxy.maglev import DEFAULT_TABLE_SIZE, NO_FORMER_OWNERS
from synproxy.netlink import interface_kind
from synproxy.salt import SaltSchedule, epoch_at
from synproxy.tfo import fastopen_keys

PROGRAM = "synproxy_front"
XDP_PROGRAM = "synproxy_front_xdp"
TC_HANDLE = TC_PRIORITY = 0x5346  # "SF": the backend program uses "SP", so one node can run both
# enum front_counter in bpf/synproxy.h, in order; each counted per IP version.
OUTCOMES = ("not_protected", "queued", "unverified", "no_salt", "syn_answered", "unrouted", "unsent",
            "validated", "forwarded", "forwarded_bad_mac", "forwarded_expired_epoch", "too_big", "unparsed",
            "icmp_forwarded", "icmp_rate_limited", "icmp_not_protected", "fastopen_cookie_issued",
            "fastopen_accepted", *(f"fastopen_{reason}" for reason in FASTOPEN_FALLBACKS), "queue_rate_limited")
FAMILIES = (4, 6)
PATHS = ("tc", "xdp")  # enum front_path: which program counted
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}  # tried in this order
_CONFIG = struct.Struct("=Qq2HBBBBBB6xQ")  # struct front_config
_FORWARDING = struct.Struct("=4s2sHQ16s16s")  # struct front_forwarding
_TOKEN_LIMIT = struct.Struct("=QQ")  # struct token_limit: cost_ns, credit_max_ns
# struct fastopen_key: period_ns, key_period, primary, backup, budget_cost_ns, budget_credit_ns
_FASTOPEN_KEY = struct.Struct("=QQ16s16sQQ")
_OWNERS = struct.Struct("4s8s")  # struct maglev_owners: the current owner, then previous and earlier (IPv4)
VIP_PORT_COUNTS = struct.Struct("=3Q")  # struct vip_port_counts, in this order:
VIP_PORT_OUTCOMES = ("syn_answered", "validated", "forwarded")
VIP_PORT_SLOTS = 64  # VIP_PORT_SLOTS in bpf/front.bpf.c: VIPs, and ports, counted per pair
PORT_UNCOUNTED = 0xFF  # PORT_UNCOUNTED in bpf/front.bpf.c: a protected port without a slot


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
            self.protected_port_slots = sized_map(self.object, "protected_port_slots", 1)
            self.salts = SaltMap(sized_map(self.object, "salts", SALT_SLOT.size))
            self.counters = sized_map(self.object, "counters", COUNTER.size)
            self.xdp_prog_fd = self.object.program_fd(XDP_PROGRAM)
            self.forwarding = sized_map(self.object, "forwarding", _FORWARDING.size)
            self.maglev = sized_map(self.object, "maglev", _OWNERS.size)
            self.icmp_limit = sized_map(self.object, "icmp_limit", _TOKEN_LIMIT.size)
            self.queue_limit = sized_map(self.object, "queue_limit", _TOKEN_LIMIT.size)
            self.fastopen_key = sized_map(self.object, "fastopen_key", _FASTOPEN_KEY.size)
            self.vip_port_counters = sized_map(self.object, "vip_port_counters", VIP_PORT_COUNTS.size)
            self.route_proof = sized_map(self.object, "route_proof", PROOFS_SIZE)
        except BaseException:
            self.object.close()
            raise
        if self.maglev.max_entries != DEFAULT_TABLE_SIZE:
            self.object.close()
            raise FastPathError(f"the program's Maglev map holds {self.maglev.max_entries} entries, the table "
                                f"{DEFAULT_TABLE_SIZE}: bpf/synproxy.h and synproxy/maglev.py disagree")
        if self.vip_port_counters.max_entries != VIP_PORT_SLOTS ** 2:
            self.object.close()
            raise FastPathError(f"the program's vip_port_counters map holds {self.vip_port_counters.max_entries} "
                                f"entries, not {VIP_PORT_SLOTS ** 2}: bpf/front.bpf.c and fastpath.py disagree")
        self.vip_slots: dict[bytes, int] = {}   # protected_vips key -> its slot (0: not counted per VIP)
        self.port_slots: dict[bytes, int] = {}  # PORT_KEY of a protected port -> its slot
        self.attached: list[int] = []
        self.xdp_attached: dict[int, str] = {}  # ifindex -> mode
        self._config_written = b""
        self._forwarding_written = b""
        self._generation = 0  # front_config.generation: the programs' per-CPU copies of forwarding and salts
        self._fastopen_written = b""
        self._maglev_written: list[tuple[bytes, bytes] | None] = [None] * DEFAULT_TABLE_SIZE
        self.route_watch: RouteWatch | None = None  # watch_routes_back(): none, no proof (a lookup per SYN)
        self.proofs: dict[int, Proof] = {}  # as route_proof holds them

    def configure(self, policy: FrontPolicy, schedule: SaltSchedule) -> None:
        """What the program protects and announces, then the salts and the clock (refresh())."""
        if len(policy.vips) > self.protected_vips.max_entries:
            raise FastPathError(f"{len(policy.vips)} VIPs: the fast path holds at most "
                                f"{self.protected_vips.max_entries}")
        try:
            self.write_protected(policy)
            self.write_maglev(policy)
            # The shell's rate (handler.ICMP_ERRORS_PER_SECOND), shared out between the CPUs.
            self.icmp_limit.update(MAP_KEY.pack(0), _TOKEN_LIMIT.pack(
                *per_cpu_token_bucket(ICMP_ERRORS_PER_SECOND, os.cpu_count() or 1)))
            # front.queue_packets_per_second, likewise (0, no budget: the map's zeros).
            self.queue_limit.update(MAP_KEY.pack(0), _TOKEN_LIMIT.pack(
                *per_cpu_token_bucket(policy.queue_packets_per_second, os.cpu_count() or 1)))
        except BpfError as error:
            raise FastPathError(f"filling the fast path's maps failed: {error.strerror}") from None
        self._generation = 0  # the programs copy the VIPs with the salts and forwarding: a new generation
        self.refresh(policy, schedule, time.time())

    def write_protected(self, policy: FrontPolicy) -> None:
        """The VIPs and ports the programs protect, each with its slot for the per-VIP counters (1 ..
        VIP_PORT_SLOTS; 0 past them: not counted, logged). A VIP or port kept across a reload keeps its
        slot and its counts; a slot given to a new one starts from zero. The ports go to the front's
        protected_port_slots array (PORT_UNCOUNTED for a port without a slot, 0 for one no longer
        protected), new ones before old ones are removed."""
        vips = {mapped(ipaddress.ip_address(vip)) for vip in policy.vips}
        ports = {PORT_KEY.pack(port) for port in policy.ports}
        removed_ports = set(self.port_slots) - ports
        fresh = {"vip": set(), "port": set()}
        for kind, slots, wanted in (("vip", self.vip_slots, vips), ("port", self.port_slots, ports)):
            for key in set(slots) - wanted:
                del slots[key]
            free = iter(sorted(set(range(1, VIP_PORT_SLOTS + 1)) - set(slots.values())))
            for key in sorted(wanted - set(slots)):
                slots[key] = next(free, 0)
                fresh[kind].add(slots[key])
        zero = bytes(VIP_PORT_COUNTS.size)
        for vip_slot in self.vip_slots.values():
            for port_slot in self.port_slots.values():
                if vip_slot and port_slot and (vip_slot in fresh["vip"] or port_slot in fresh["port"]):
                    self.vip_port_counters.update(MAP_KEY.pack(_vip_port_index(vip_slot, port_slot)), zero)
        uncounted = sum(not slot for slot in (*self.vip_slots.values(), *self.port_slots.values()))
        if uncounted:
            log("vip_port_counters_partial", uncounted=uncounted, most_vips=VIP_PORT_SLOTS,
                most_ports=VIP_PORT_SLOTS)
        replace_entries(self.protected_vips, {key: bytes([slot]) for key, slot in self.vip_slots.items()})
        for key, slot in self.port_slots.items():
            self.protected_port_slots.update(MAP_KEY.pack(*PORT_KEY.unpack(key)), bytes([slot or PORT_UNCOUNTED]))
        for key in removed_ports:
            self.protected_port_slots.update(MAP_KEY.pack(*PORT_KEY.unpack(key)), b"\0")

    def vip_port_counts(self) -> dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], tuple[int, ...]]:
        """Both programs' counts per counted (VIP, port), summed over the CPUs, in VIP_PORT_OUTCOMES' order."""
        totals = {}
        for vip_key, vip_slot in self.vip_slots.items():
            vip = ipaddress.ip_address(vip_key)
            for port_key, port_slot in self.port_slots.items():
                if vip_slot and port_slot:
                    per_cpu = self.vip_port_counters.lookup(MAP_KEY.pack(_vip_port_index(vip_slot, port_slot)))
                    totals[vip.ipv4_mapped or vip, PORT_KEY.unpack(port_key)[0]] = tuple(
                        map(sum, zip(*(VIP_PORT_COUNTS.unpack(value) for value in per_cpu))))
        return totals

    def write_maglev(self, policy: FrontPolicy) -> None:
        """The handler's own tables, slot by slot where they changed (after a reload, or when a slot's
        former owner expired). The former owners are written before the current one, in a separate
        update: a packet meanwhile goes to the old owner (naming the new former owners, among them the
        old owner itself when a change moved the slot, which it skips), never to a new owner without the
        former owners its old connections need."""
        if len(policy.table) != DEFAULT_TABLE_SIZE:
            raise FastPathError(f"a Maglev table of {len(policy.table)} entries: the fast path holds "
                                f"{DEFAULT_TABLE_SIZE}")
        if any(len(backend) != 4 for backend in policy.backends):
            raise FastPathError("the fast path encapsulates to IPv4 backends only")
        written = self._maglev_written
        formers = policy.previous.owners if policy.previous is not None else [NO_FORMER_OWNERS] * DEFAULT_TABLE_SIZE
        try:
            for index, owner in enumerate(policy.owner_table()):
                wanted = (owner, formers[index])
                before = written[index]
                if before == wanted:
                    continue
                if before is not None and before[0] != owner and before[1] != wanted[1]:
                    self.maglev.update(MAP_KEY.pack(index), _OWNERS.pack(before[0], wanted[1]))
                self.maglev.update(MAP_KEY.pack(index), _OWNERS.pack(*wanted))
                written[index] = wanted
        except BpfError as error:
            raise FastPathError(f"filling the fast path's Maglev map failed: {error.strerror}") from None

    def refresh(self, policy: FrontPolicy, schedule: SaltSchedule, now: float) -> None:
        """At every housekeeping: the salts of the two epochs before the current one, the current one and
        the next (every epoch an ACK's cookie may be accepted in, and a SYN arriving just past an epoch
        boundary finds its salt; the program checks the epoch against its clock), and the configuration
        when it changed. When the salts or the forwarding element changed, the configuration is written
        after them with a new generation: the programs' per-CPU copies of both are then copied again."""
        epoch = schedule.current_epoch(now)
        forwarding = _FORWARDING.pack(policy.farm_address, policy.encap_port.to_bytes(2, "big"), policy.farm_mtu,
                                      round(schedule.skew * 1e9), policy.encap_key, policy.flow_key)
        try:
            changed = self.salts.refresh(schedule, range(max(0, epoch - 2), epoch + 2))
            changed |= self.refresh_route_back()
            if forwarding != self._forwarding_written:
                self.forwarding.update(MAP_KEY.pack(0), forwarding)
                self._forwarding_written = forwarding
                changed = True
            if changed or not self._generation:
                self._generation = int.from_bytes(os.urandom(8), "little") or 1
            value = _CONFIG.pack(round(schedule.period * 1e9), clock_offset_ns(), policy.announced_mss(4),
                                 policy.announced_mss(6), policy.server_wscale, policy.sack, policy.ecn,
                                 policy.syn_reply == "ingress", policy.timestamps, policy.window_scaling,
                                 self._generation)
            if value != self._config_written:
                self.config.update(MAP_KEY.pack(0), value)
                self._config_written = value
            self.refresh_fastopen_key(policy, now)
        except BpfError as error:
            self._generation = 0  # what was written before the failure: copied again after the next refresh
            raise FastPathError(f"updating the fast path's maps failed: {error.strerror}") from None

    def watch_routes_back(self) -> None:
        """Prove the route back to clients from this network namespace's routing (call it in the namespace
        the programs run in: their lookups are its) and keep the proof current at every refresh(); until
        then, and whenever a family's proof fails, each SYN's route back is looked up (routes_back.py)."""
        try:
            self.route_watch = RouteWatch()
        except OSError as error:
            log("route_back_unproved", family="ipv4, ipv6", reason=f"no netlink socket: {error.strerror}")

    def refresh_route_back(self) -> bool:
        """The proofs into route_proof when the routing may have changed; True when a proof changed (the
        programs then need a new generation: to copy it, and to drop the next hops they kept)."""
        if self.route_watch is None:
            return False
        try:
            if not self.route_watch.changed():
                return False
            proofs = self.route_watch.proofs()
        except OSError as error:  # the event socket failed: no proof, and another try at the next refresh
            proofs = {family: Proof(refused=f"netlink: {error.strerror}") for family in (4, 6)}
            self.route_watch.stale = True
        for family, proof in proofs.items():
            if proof != self.proofs.get(family):
                if proof.refused:
                    log("route_back_unproved", family=f"ipv{family}", reason=proof.refused,
                        **({"detail": proof.detail} if proof.detail else {}))
                else:
                    log("route_back_proved", family=f"ipv{family}", probe=str(proof.probe),
                        exceptions=[str(network) for network in proof.exceptions])
        if proofs == self.proofs:
            return False
        try:
            self.route_proof.update(MAP_KEY.pack(0), proofs[4].packed() + proofs[6].packed())
        except BpfError:
            self.route_watch.stale = True  # written again at the next refresh
            raise
        self.proofs = proofs
        return True

    def refresh_fastopen_key(self, policy: FrontPolicy, now: float) -> None:
        """The TFO keys the programs answer cookie requests with and accept cookies for: this key
        period's primary and backup (the programs leave TFO SYNs to the queue while they are another
        period's), and the per-source budget (FastOpenLimit's); none without tfo.enabled."""
        if policy.tfo_secret is None:
            if self._fastopen_written:
                self.fastopen_key.delete(MAP_KEY.pack(0))
                self._fastopen_written = b""
            return
        key_period = epoch_at(now, policy.tfo_key_period)
        primary, backup = fastopen_keys(policy.tfo_secret, now, policy.tfo_key_period)
        cost_ns = NS_PER_SECOND // FASTOPEN_PER_SOURCE_RATE
        value = _FASTOPEN_KEY.pack(round(policy.tfo_key_period * 1e9), key_period, primary, backup, cost_ns,
                                   cost_ns * FASTOPEN_PER_SOURCE_BURST)
        if value != self._fastopen_written:
            self.fastopen_key.update(MAP_KEY.pack(0), value)
            self._fastopen_written = value

    def attach(self, interfaces: Iterable[str]) -> None:
        for name in interfaces:
            ifindex = _interface_index(name)
            try:
                tc_attach(ifindex, self.prog_fd, TC_HANDLE, TC_PRIORITY)
            except BpfError as error:
                raise FastPathError(f"attaching to {name}'s tc ingress failed: {error.strerror}") from None
            self.attached.append(ifindex)

    def attach_xdp(self, interfaces: Iterable[str], xdp_mode: str = "auto") -> dict[str, str]:
        """Attach the XDP program in ``xdp_mode`` (auto: xdp_modes_for()), never over another program but
        over the one a dead front left. Returns the mode per interface."""
        modes = {}
        for name in interfaces:
            ifindex = _interface_index(name)
            _detach_leftover(name, ifindex)
            failures = []
            for mode in xdp_modes_for(name, xdp_mode):
                try:
                    xdp_attach(ifindex, self.xdp_prog_fd, XDP_MODES[mode] | XDP_FLAGS_UPDATE_IF_NOEXIST)
                except BpfError as error:
                    failures.append(f"{mode}: {error.strerror}")
                    continue
                self.xdp_attached[ifindex] = modes[name] = mode
                break
            else:
                raise FastPathError(f"attaching XDP to {name} failed ({'; '.join(failures)})")
        return modes

    def missing(self) -> list[str]:
        """The attachments that are gone (a filter or an XDP program someone removed or replaced, or an
        interface that went): the readiness check (synproxy/health.py) withdraws the front for them."""
        gone = []
        tc_id, xdp_id = program_id(self.prog_fd), program_id(self.xdp_prog_fd)
        for path, ifindexes, wanted in (("tc", self.attached, tc_id), ("xdp", self.xdp_attached, xdp_id)):
            for ifindex in ifindexes:
                try:
                    found = (tc_attached_program(ifindex, TC_HANDLE, TC_PRIORITY) if path == "tc"
                             else (xdp_attached_program(ifindex) or (None,))[0])
                except BpfError:
                    found = None
                if found != wanted:
                    gone.append(f"{path} on ifindex {ifindex}")
        return gone

    def counts(self, path: str) -> dict[tuple[str, int], int]:
        """One program's per-CPU counters summed, by (outcome, IP version)."""
        base = PATHS.index(path) * len(OUTCOMES)
        totals = {}
        for index, outcome in enumerate(OUTCOMES):
            for offset, family in enumerate(FAMILIES):
                totals[outcome, family] = counter_total(self.counters, (base + index) * 2 + offset)
        return totals

    def close(self) -> None:
        if self.route_watch is not None:
            self.route_watch.close()
            self.route_watch = None
        for ifindex in self.attached:
            try:
                tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
            except BpfError:
                pass  # the interface went away, and the filter with it
        self.attached.clear()
        for ifindex, mode in self.xdp_attached.items():
            try:
                xdp_detach(ifindex, XDP_MODES[mode], self.xdp_prog_fd)
            except BpfError:
                pass  # the interface went away, and the program with it
        self.xdp_attached.clear()
        self.object.close()


def _vip_port_index(vip_slot: int, port_slot: int) -> int:
    """The pair's element in vip_port_counters (seg.vip_port - 1 in bpf/front.bpf.c's handle_frame)."""
    return (vip_slot - 1) * VIP_PORT_SLOTS + port_slot - 1


def _interface_index(name: str) -> int:
    try:
        return interface_index(name)
    except SetupError as error:
        raise FastPathError(f"front.interfaces: {error}") from None


def xdp_modes_for(name: str, xdp_mode: str) -> tuple[str, ...]:
    """The XDP modes to try on an interface, in order. auto: native, else generic; but generic alone on a
    veth, whose native XDP_TX frames are lost unless the peer runs an XDP program too (docs/front.md)."""
    if xdp_mode != "auto":
        return (xdp_mode,)
    return ("generic",) if interface_kind(name) == "veth" else ("native", "generic")


def _detach_leftover(name: str, ifindex: int) -> None:
    """A front killed with its program attached leaves it there (docs/front.md); only one front runs per
    namespace (synproxy/instance.py), so a program of our name on the interface is that one's."""
    try:
        attached = xdp_attached_program(ifindex)
        if attached is None or program_name(attached[0]) != XDP_PROGRAM[:15]:
            return
        xdp_detach_id(ifindex, attached[1], attached[0])
    except BpfError as error:
        raise FastPathError(f"removing the XDP program a previous front left on {name} failed: "
                            f"{error.strerror}") from None
    log("xdp_leftover_detached", interface=name, program_id=attached[0])


def remove_leftovers(interfaces: Iterable[str]) -> None:
    """Every start, whatever its data plane: the programs a killed front left on these interfaces (its tc
    filter, by our handle; its XDP program, by name) would otherwise keep answering from stale maps for up
    to two salt periods, and XDP encapsulating segments for as long as it stays (docs/front.md). An
    interface that does not exist has none (a kernel data plane then fails on it by name)."""
    for name in interfaces:
        try:
            ifindex = interface_index(name)
        except SetupError:
            continue
        try:
            left = tc_attached_program(ifindex, TC_HANDLE, TC_PRIORITY)
            if left is not None:
                tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
                log("tc_leftover_detached", interface=name, program_id=left)
        except BpfError as error:
            raise FastPathError(f"removing the tc filter a previous front left on {name} failed: "
                                f"{error.strerror}") from None
        _detach_leftover(name, ifindex)


def start(data_plane: str, interfaces: tuple[str, ...], xdp_mode: str, policy: FrontPolicy,
          schedule: SaltSchedule) -> tuple[FastPath, dict[str, str]]:
    """Build, load and fill the program, attach it at tc ingress on the interfaces and, for the xdp data
    plane, at XDP too (the tc program then sees what XDP passes: it answers a SYN XDP passes for an
    unresolved neighbour; it decides the rest as XDP did, both share the decisions). Returns it
    and the XDP mode per interface."""
    try:
        fast_path = FastPath(build_object("front"))
    except SetupError as error:
        raise FastPathError(str(error)) from None
    except BpfError as error:
        raise FastPathError(f"loading bpf/front.bpf.c failed: {error.strerror}") from None
    try:
        fast_path.watch_routes_back()
        fast_path.configure(policy, schedule)
        fast_path.attach(interfaces)
        xdp_modes = fast_path.attach_xdp(interfaces, xdp_mode) if data_plane == "xdp" else {}
    except BaseException:
        fast_path.close()
        raise
    return fast_path, xdp_modes


def select(wanted: str, interfaces: tuple[str, ...], xdp_mode: str, policy: FrontPolicy,
           schedule: SaltSchedule) -> tuple[str, FastPath | None, dict[str, str], str]:
    """The data plane front.data_plane asks for: (mode, the attached programs or None, XDP mode per
    interface, why). auto tries xdp, then tc, then settles for nfqueue, logging each failure; an explicit
    mode that fails raises FastPathError. A dead front's programs are removed first, in every mode."""
    remove_leftovers(interfaces)
    if wanted == "nfqueue":
        return "nfqueue", None, {}, "front.data_plane: nfqueue"
    if not interfaces:
        problem = "front.interfaces is empty and this node has no default route to take them from"
        if wanted != "auto":
            raise FastPathError(problem)
        log("data_plane_unavailable", mode="xdp, tc", error=problem)
        return "nfqueue", None, {}, f"auto: {problem}"
    failures = []
    for mode in ("xdp", "tc") if wanted == "auto" else (wanted,):
        try:
            fast_path, xdp_modes = start(mode, interfaces, xdp_mode, policy, schedule)
        except FastPathError as error:
            if wanted != "auto":
                raise
            log("data_plane_unavailable", mode=mode, error=str(error))
            failures.append(f"{mode}: {error}")
            continue
        reason = f"front.data_plane: {mode}" if wanted == mode else f"auto: {mode} loaded and attached"
        return mode, fast_path, xdp_modes, "; ".join([reason, *failures])
    return "nfqueue", None, {}, "auto: " + "; ".join(failures)
