"""The front's per-packet decision, sans-IO: bytes in, a verdict out (no sockets, no scapy).

A SYN becomes a SYN-ACK whose ISN is the cookie (returned in place of the SYN, so the NFQUEUE shell
needs one verdict and no second socket). Every other packet to a protected VIP and port is
encapsulated to the backend the Maglev table picks, naming the slot's former owners (Beamer's chain,
maglev.PreviousOwners); a handshake ACK whose cookie validates is flagged VALIDATED so the backend
creates the connection. A packet too big to encapsulate within the farm's MTU
is answered as a router would (ICMP "fragmentation needed" / ICMPv6 "packet too big" from the VIP), so
the client's path-MTU discovery shrinks its packets. An ICMP error about a protected flow (a router
towards the client saying "fragmentation needed", "packet too big", "unreachable" or "time exceeded" to
the VIP) is encapsulated, flagged ICMP, to the backend that owns the flow, whose TCP then lowers its path
MTU (or gives up). No per-flow state is kept.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from synproxy import encap
from synproxy.cookie import Reject, check_cookie, make_cookie
from synproxy.maglev import NO_FORMER_OWNERS, PreviousOwners, build_table, flow_hash
from synproxy.packet import (
    ACK,
    CWR,
    ECE,
    FIN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    RST,
    SYN,
    FastOpen,
    MalformedPacket,
    build_icmp_too_big,
    build_tcp_options,
    build_tcp_packet,
    new_record,
    parse_icmp_error,
    parse_tcp,
    parse_tcp_options,
    tcp_checksum_valid,
)
from synproxy.salt import SaltSchedule
from synproxy.tfo import DEFAULT_KEY_PERIOD_SECONDS, fastopen_cookie, fastopen_keys

SYN_ACK_WINDOW = 65535
_REJECTED = {reason: f"forwarded_{reason.value}" for reason in Reject}
_IPV6_EXTRA = 20  # an IPv6 header is 20 bytes longer than an IPv4 one
_IPV4_DONT_FRAGMENT = 0x40  # in the byte at offset 6
TOO_BIG = "too_big"
ICMP_FORWARDED = "icmp_forwarded"
# ICMP errors forwarded per second by one front, and the burst (the shell's TokenBucket; the XDP program's
# per-CPU buckets share the same rate and burst out). A router sends one "too big" per burst of
# segments, and Linux rate-limits its own errors to ~1/s per destination; past the budget they are
# dropped (`icmp_rate_limited`), so a flood of forged errors reaches the backends at this rate at most.
ICMP_ERRORS_PER_SECOND, ICMP_ERRORS_BURST = 1000, 1000
FASTOPEN_ACCEPTED = "fastopen_accepted"
# TFO SYNs one client address may send to the backends (FastOpenLimit), beyond which its TFO SYNs take the
# stateless cookie path. A browser opens at most 6 connections per host at once and reuses them; 20 at
# once and 10 a second afterwards leave room for a NAT of a few users and keep one address from
# holding more than a sliver of a backend listener's TFO queue (qlen 256 in the lab's nginx).
FASTOPEN_PER_SOURCE_RATE, FASTOPEN_PER_SOURCE_BURST = 10, 20
# Addresses FastOpenLimit remembers: 3.7-3.9 MB for 16384 (225-237 bytes each, IPv4-IPv6, tracemalloc);
# a take costs ~0.5 us. A forgotten address starts again with a full bucket, so an address whose bucket
# ran dry gains at most one burst per eviction.
FASTOPEN_SOURCES = 16384


class Action(enum.Enum):
    REPLY = "reply"      # send the returned packet back towards the client
    FORWARD = "forward"  # send the returned (encapsulated) packet to a backend
    DROP = "drop"


class Verdict(NamedTuple):
    action: Action
    packet: bytes | None
    outcome: str          # counter label: what happened and why (docs/metrics.md)
    backend: int = -1     # index into FrontPolicy.backends for FORWARD
    # A SYN with a TCP Fast Open option: "requested" (a cookie asked for, tfo.enabled), "accepted"
    # (forwarded), or why its cookie took the stateless path (FASTOPEN_FALLBACKS); "" otherwise.
    fastopen: str = ""


# Why a SYN carrying a TFO cookie got the cookie SYN-ACK instead of reaching a backend (docs/front.md).
FASTOPEN_FALLBACKS = ("disabled", "invalid_cookie", "no_data", "rate_limited", "too_big")
# The Verdict.fastopen of a SYN-ACK that carries a TFO cookie (with tfo.enabled, Linux's rule: a
# request's, and a cookie's it does not accept).
FASTOPEN_COOKIE_ISSUED = frozenset({"requested", *FASTOPEN_FALLBACKS} - {"disabled"})


@dataclass(frozen=True)
class FrontPolicy:
    """What a front needs to decide, built once from the configuration."""

    vips: frozenset[bytes]
    ports: frozenset[int]
    farm_address: bytes
    backends: tuple[bytes, ...]  # those new connections go to: the current table's (no draining or down one)
    encap_port: int
    encap_key: bytes   # encap.encap_key of the minting secret: the backends check the MAC with it
    flow_key: bytes       # maglev.derive_flow_key: the same on every front, unknown outside
    backend_mss: int = 1460
    server_wscale: int = 7
    sack: bool = True
    ecn: bool = True
    timestamps: bool = True      # answer a client's timestamps (config `timestamps`)
    window_scaling: bool = True  # answer a client's window scale, and record it in the cookie
    farm_mtu: int = 1500
    syn_reply: str = "route"  # front.syn_reply: where the kernel data plane sends a SYN-ACK (docs/front.md)
    # front.queue_packets_per_second: the most the kernel data plane leaves to the queue, whose reader this
    # handler is; 0: no budget.
    queue_packets_per_second: int = 0
    weights: tuple[int, ...] = ()          # per backend; () = all 1
    draining: tuple[tuple[bytes, int], ...] = ()  # (address, weight): chained to, never new connections
    down: frozenset[bytes] = frozenset()    # never chained to: their connections reset
    # The shell's history (it calls previous.follow with this policy's tables); None: nothing is chained.
    previous: PreviousOwners | None = field(default=None, compare=False)
    tfo_secret: bytes | None = None   # the master secret the TFO keys come from; None: TFO cookies not offered
    tfo_key_period: float = DEFAULT_KEY_PERIOD_SECONDS

    def __post_init__(self) -> None:
        table = build_table([addr.hex() for addr in self.backends], weights=list(self.weights) or None)
        object.__setattr__(self, "_table", table)

    @property
    def table(self) -> list[int]:
        """The Maglev table (backend indexes): the front's BPF program gets its map from this one build."""
        return self._table

    def owner_table(self) -> list[bytes]:
        """The current owner's address per slot."""
        backends = self.backends
        return [backends[index] for index in self._table]

    def draining_table(self) -> list[bytes]:
        """Per slot, the draining backend that would own it without the drain, else its current owner:
        the table built with the draining backends as if active, which moves only their slots."""
        if not self.draining:
            return self.owner_table()
        everyone = [*self.backends, *(address for address, _ in self.draining)]
        weights = [*(self.weights or [1] * len(self.backends)), *(weight for _, weight in self.draining)]
        draining = frozenset(address for address, _ in self.draining)
        current = self.owner_table()
        return [everyone[index] if everyone[index] in draining else owner
                for index, owner in zip(build_table([a.hex() for a in everyone], weights=weights), current)]

    def backend_for(self, flow: int) -> int:
        table = self._table
        return table[flow % len(table)]

    def former_owners(self, flow: int) -> bytes:
        """The flow's former owners as the encapsulation carries them (docs/backend.md, the chain)."""
        previous = self.previous
        return previous.owners[flow % len(self._table)] if previous is not None else NO_FORMER_OWNERS

    def announced_mss(self, family: int) -> int:
        """The MSS clients may send: the backends' less the encapsulation (and IPv6's longer header)."""
        return self.backend_mss - encap.OVERHEAD - (_IPV6_EXTRA if family == 6 else 0)

    @property
    def encapsulation_mtu(self) -> int:
        """The largest client packet that still fits the farm's MTU once encapsulated."""
        return self.farm_mtu - encap.OVERHEAD


def handle(packet: bytes, now: float, schedule: SaltSchedule, policy: FrontPolicy,
           fastopen_limit: FastOpenLimit | None = None) -> Verdict:
    """Decide what to do with one packet queued to this front. ``fastopen_limit``: the shell's per-source
    budget of TFO SYNs; without one, no TFO SYN is forwarded."""
    try:
        segment = parse_tcp(packet)
    except MalformedPacket as error:
        # Checked only here: the TCP path pays nothing for the ICMP one.
        if error.reason == "not_tcp" and packet[9 if packet[0] >> 4 == 4 else 6] in (PROTO_ICMP, PROTO_ICMPV6):
            return _icmp_error(packet, policy)
        if error.reason == "bad_ip_length" and (verdict := _cut_too_big(packet, policy)):
            return verdict
        return Verdict(Action.DROP, None, f"malformed_{error.reason}")
    if segment.daddr not in policy.vips or segment.dport not in policy.ports:
        return Verdict(Action.DROP, None, "not_protected")
    flags = segment.flags
    if flags & SYN:
        if flags & (ACK | RST | FIN):
            return Verdict(Action.DROP, None, "invalid_flags")
        if not tcp_checksum_valid(packet, segment):
            return Verdict(Action.DROP, None, "malformed_bad_checksum")
        try:
            return _answer_syn(packet, segment, now, schedule, policy, fastopen_limit)
        except MalformedPacket as error:
            return Verdict(Action.DROP, None, f"malformed_{error.reason}")
    if len(packet) > policy.encapsulation_mtu:
        return _too_big(packet, policy)
    validated = False
    outcome = "forwarded"
    if flags & ACK and not flags & (RST | FIN):
        result = check_cookie(schedule, now, segment.saddr, segment.daddr, segment.sport, segment.dport,
                              (segment.seq - 1) & 0xFFFFFFFF, (segment.ack - 1) & 0xFFFFFFFF)
        validated = not isinstance(result, Reject)
        if validated and not tcp_checksum_valid(packet, segment):
            return Verdict(Action.DROP, None, "malformed_bad_checksum")
        # Established traffic carries no cookie either: it is forwarded under the same labels.
        outcome = "validated" if validated else _REJECTED[result]
    flow = flow_hash(segment.saddr, segment.daddr, segment.sport, segment.dport, policy.flow_key)
    backend = policy.backend_for(flow)
    wrapped = encap.encapsulate(packet, segment, policy.farm_address, policy.backends[backend], policy.encap_port,
                                flow, validated, policy.encap_key, policy.former_owners(flow))
    return Verdict(Action.FORWARD, wrapped, outcome, backend)


def _cut_too_big(packet: bytes, policy: FrontPolicy) -> Verdict | None:
    """The router's answer to a packet too big to encapsulate whose queued copy was cut: NFQUEUE copies at
    most ~4 KB (netfilterqueue's copy range), and the kernel drops a packet shorter than its IP length
    before PREROUTING, so a shorter copy is a cut one, of a frame from a jumbo link. Judged as the whole
    packet would be; None when it would not be answered "too big"."""
    declared = int.from_bytes(packet[2:4], "big") if packet[0] >> 4 == 4 else 40 + int.from_bytes(packet[4:6], "big")
    if len(packet) >= declared or declared <= policy.encapsulation_mtu:
        return None
    as_copied = bytearray(packet)  # the copy's own length, to read its headers
    if packet[0] >> 4 == 4:
        as_copied[2:4] = len(packet).to_bytes(2, "big")
    else:
        as_copied[4:6] = (len(packet) - 40).to_bytes(2, "big")
    try:
        segment = parse_tcp(bytes(as_copied))
    except MalformedPacket:
        return None
    if segment.daddr not in policy.vips or segment.dport not in policy.ports or segment.flags & SYN:
        return None
    return _too_big(packet, policy)


def _too_big(packet: bytes, policy: FrontPolicy) -> Verdict:
    """The router's answer (RFC 1191, RFC 8201). An IPv4 packet without DF is dropped instead of
    fragmented: a router would fragment it, but the backend's tc program sees outer fragments before
    reassembly and the handler drops inner ones (`malformed_fragment`), so fragments would deliver
    nothing; TCP senders set DF (Linux does unless ip_no_pmtu_disc is set)."""
    if packet[0] >> 4 == 4 and not packet[6] & _IPV4_DONT_FRAGMENT:
        return Verdict(Action.DROP, None, "too_big_not_df")
    return Verdict(Action.REPLY, build_icmp_too_big(packet, policy.encapsulation_mtu), TOO_BIG)


def _icmp_error(packet: bytes, policy: FrontPolicy) -> Verdict:
    """An ICMP error to a VIP about a segment from a protected VIP and port goes where the flow's packets
    go (the same flow hash, so the same backend, on every front), flagged ICMP: the backend's stack
    finds the socket from the quoted segment (Katran and GLB do the same). Whoever can send ICMP to a
    VIP reaches only the TCP of the backend owning that flow, which checks the quoted sequence number."""
    try:
        error = parse_icmp_error(packet)
    except MalformedPacket as reason:
        return Verdict(Action.DROP, None, f"malformed_{reason.reason}")
    if (error.destination != error.daddr or error.daddr not in policy.vips
            or error.dport not in policy.ports):
        return Verdict(Action.DROP, None, "icmp_not_protected")
    if len(packet) > policy.encapsulation_mtu:  # a router quotes at most 576 (IPv4) or 1280 (IPv6) bytes
        return Verdict(Action.DROP, None, "icmp_too_big")
    flow = flow_hash(error.saddr, error.daddr, error.sport, error.dport, policy.flow_key)
    backend = policy.backend_for(flow)
    wrapped = encap.encapsulate(packet, error, policy.farm_address, policy.backends[backend], policy.encap_port,
                                flow, False, policy.encap_key, policy.former_owners(flow), icmp=True)
    return Verdict(Action.FORWARD, wrapped, ICMP_FORWARDED, backend)


class TokenBucket:
    """Allows ``rate`` events a second on average and ``burst`` at once; the caller says what time it is
    (a monotonic clock), so tests need no sleeping."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class FastOpenLimit:
    """A token bucket (TokenBucket's rule) per client address for the TFO SYNs a front forwards, for the
    ``sources`` addresses seen last (an LRU: bounded memory whatever the number of addresses). A valid
    TFO cookie is per address, so whoever owns addresses can get cookies for them and flood backends
    with TFO SYNs; this bounds what each address sends, the backends' TFO queue (the listener's qlen)
    what all of them together leave pending."""

    def __init__(self, rate: float = FASTOPEN_PER_SOURCE_RATE, burst: float = FASTOPEN_PER_SOURCE_BURST,
                 sources: int = FASTOPEN_SOURCES):
        self.rate, self.burst, self.sources = rate, burst, sources
        self.buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def take(self, source: bytes, now: float) -> bool:
        buckets = self.buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= self.sources:
                buckets.popitem(last=False)
            bucket = buckets[source] = TokenBucket(self.rate, self.burst)
        else:
            buckets.move_to_end(source)
        return bucket.take(now)


def _answer_syn(packet: bytes, segment, now: float, schedule: SaltSchedule, policy: FrontPolicy,
                fastopen_limit: FastOpenLimit | None) -> Verdict:
    # Every SYN of a flood comes here: plain tuples and new_record instead of NamedTuple constructors.
    mss, wscale, sack_permitted, timestamp, fastopen = parse_tcp_options(segment.raw_options)
    fastopen_result = ""
    if fastopen is not None:
        fastopen_result = _fastopen_decision(packet, segment, fastopen, now, policy, fastopen_limit)
        if fastopen_result == "accepted":
            return _forward_fastopen(packet, segment, policy)
    ecn = policy.ecn and segment.flags & (ECE | CWR) == (ECE | CWR)
    sack = policy.sack and sack_permitted
    if not policy.window_scaling:
        wscale = None
    if not policy.timestamps:
        timestamp = None
    epoch, salt = schedule.minting_salt(now)
    cookie = make_cookie(salt, epoch, segment.saddr, segment.daddr, segment.sport, segment.dport,
                         segment.seq, (mss, wscale, sack, ecn))
    if timestamp is not None:
        timestamp = (int(now * 1000) & 0xFFFFFFFF, timestamp[0])
    options = build_tcp_options(policy.announced_mss(segment.family),
                                policy.server_wscale if wscale is not None else None, sack, timestamp,
                                fastopen and _fastopen_reply(fastopen, segment, now, policy))
    reply = build_tcp_packet(segment.daddr, segment.saddr, segment.dport, segment.sport, cookie,
                             (segment.seq + 1) & 0xFFFFFFFF, SYN | ACK | (ECE if ecn else 0),
                             SYN_ACK_WINDOW, options)
    return new_record(Verdict, (Action.REPLY, reply, "syn_answered", -1, fastopen_result))


def _fastopen_decision(packet: bytes, segment, fastopen: FastOpen, now: float, policy: FrontPolicy,
                       fastopen_limit: FastOpenLimit | None) -> str:
    """What a SYN's TFO option gets: "requested" (no cookie in it), "accepted" (a valid cookie: the SYN
    goes to the flow's backend, whose kernel checks the cookie again with the same keys and opens the
    connection with the SYN's data), or a reason from FASTOPEN_FALLBACKS, under which it is answered as
    any SYN. A cookie is checked as Linux checks it (tcp_fastopen_cookie_gen_check): the primary's or
    the backup's, for this client address and VIP. A SYN without data gains nothing from the backend
    (Linux clients send a cookie only with data), and one too big to encapsulate could not reach it."""
    if policy.tfo_secret is None:
        return "disabled" if fastopen.cookie else ""
    if not fastopen.cookie:
        return "requested"
    if fastopen.cookie not in (fastopen_cookie(key, segment.saddr, segment.daddr)
                               for key in fastopen_keys(policy.tfo_secret, now, policy.tfo_key_period)):
        return "invalid_cookie"
    if not segment.payload_length:
        return "no_data"
    if len(packet) > policy.encapsulation_mtu:
        return "too_big"
    if fastopen_limit is None or not fastopen_limit.take(segment.saddr, now):
        return "rate_limited"
    return "accepted"


def _forward_fastopen(packet: bytes, segment, policy: FrontPolicy) -> Verdict:
    """A TFO SYN with a valid cookie, encapsulated flagged FASTOPEN to the flow's backend (the same one
    its ACK and every later packet go to), whose stack creates the connection and answers directly."""
    flow = flow_hash(segment.saddr, segment.daddr, segment.sport, segment.dport, policy.flow_key)
    backend = policy.backend_for(flow)
    wrapped = encap.encapsulate(packet, segment, policy.farm_address, policy.backends[backend], policy.encap_port,
                                flow, False, policy.encap_key, policy.former_owners(flow), fastopen=True)
    return Verdict(Action.FORWARD, wrapped, FASTOPEN_ACCEPTED, backend, "accepted")


def _fastopen_reply(fastopen: FastOpen, segment, now: float, policy: FrontPolicy) -> FastOpen | None:
    """The TFO option of the cookie SYN-ACK to a SYN that carries one: the cookie the backends' kernels
    make for this client and VIP with the farm's primary key, in the form the client used
    (docs/cookie.md, "TCP Fast Open"). Linux answers so both a request and a cookie it does not accept
    (here: any the SYN-ACK answers, _fastopen_decision), whose SYN's data then waits for the handshake,
    and the client resends it."""
    if policy.tfo_secret is None:
        return None
    primary, _backup = fastopen_keys(policy.tfo_secret, now, policy.tfo_key_period)
    return FastOpen(fastopen_cookie(primary, segment.saddr, segment.daddr), fastopen.experimental)
