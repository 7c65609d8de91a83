"""The route back to clients, proved from the routing table so that the front's programs need no
bpf_fib_lookup per SYN (~200 ns of a SYN's ~550 at XDP, docs/front.md, "The SYN-ACK's way back").

A SYN flood's sources are random, so no cache keyed by client helps; but a front usually routes every
client through one gateway, and only a few prefixes (its own subnets, a few static routes) differ. With
the kernel's default policy rules only (local, main and, IPv4, default), the kernel answers for a
client address by the longest matching prefix of the local and main tables, then the default table: so
an address that no route of those tables covers except one single-nexthop default route via a gateway
is routed to that gateway, whatever the address. prove() checks that from a dump (pure: records in,
proof out); the programs then look up one address outside every exception (the probe) for every such
client, and every other client, or every client when the proof fails, as before. RouteWatch is the
shell: a netlink socket subscribed to the changes that can break the proof, read at every refresh.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import rt_type

from synproxy.bpf.loading import mapped

MAX_EXCEPTIONS = 32  # ROUTE_BACK_EXCEPTIONS in bpf/front.bpf.c: every client pays one compare per exception
# Beyond this many routes in a family no proof is tried: a front that holds a full Internet table would
# otherwise be read whole (in Python, ~1M routes) at every change its routing daemon makes.
MAX_ROUTES_READ = 1024
LOCAL_TABLE, MAIN_TABLE, DEFAULT_TABLE = 255, 254, 253
# (priority, table) of the rules a namespace starts with; no others may exist.
DEFAULT_RULES = {4: {(0, LOCAL_TABLE), (32766, MAIN_TABLE), (32767, DEFAULT_TABLE)},
                 6: {(0, LOCAL_TABLE), (32766, MAIN_TABLE)}}
FR_ACT_TO_TBL = 1
NO_SUPPRESS_PREFIXLEN = 0xFFFFFFFF
_RULE_ATTRIBUTES = {"FRA_TABLE", "FRA_PRIORITY", "FRA_PROTOCOL", "FRA_SUPPRESS_PREFIXLEN"}
# What a single-nexthop default route may carry: anything else (multipath, a nexthop object, an
# encapsulation, a source prefix) is refused rather than understood.
_DEFAULT_ROUTE_ATTRIBUTES = {"RTA_TABLE", "RTA_GATEWAY", "RTA_VIA", "RTA_OIF", "RTA_PRIORITY", "RTA_PREFSRC",
                             "RTA_METRICS", "RTA_CACHEINFO", "RTA_PREF", "RTA_EXPIRES", "RTA_FLOW"}
# struct route_back_family: enabled, exceptions_count, probe, exceptions (network, mask: 16-byte forms);
# struct route_back_proof holds IPv4's, then IPv6's.
_FAMILY = struct.Struct(f"=II16s{MAX_EXCEPTIONS * 32}s")
PROOFS_SIZE = 2 * _FAMILY.size
# Netlink groups whose messages may change the proof (<linux/rtnetlink.h>): links, addresses (their local
# routes), routes, rules, nexthop objects. Neighbours do not: the programs look the probe up again
# every ROUTE_CACHE_JIFFIES.
_GROUPS = (1, 5, 7, 8, 9, 11, 19, 32)  # LINK, IPV4_IFADDR, IPV4_ROUTE, IPV4_RULE, IPV6_IFADDR, IPV6_ROUTE, IPV6_RULE, NEXTHOP
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    plain: bool  # from all, no selector, action "lookup"


@dataclass(frozen=True)
class Route:
    table: int
    network: Network
    unicast: bool
    via_gateway: bool
    plain: bool  # one nexthop given inline, no TOS, no source prefix, nothing else _DEFAULT_ROUTE_ATTRIBUTES lacks
    next_hop: str = ""  # its gateway and interface, as the dump gives them


@dataclass(frozen=True)
class Proof:
    """Every client address outside `exceptions` is routed as `probe` is, to the default route's `next_hop`;
    `refused` says why not, if not. A new next hop is a new proof, though the programs' map does not hold
    it: their kept lookups are then dropped at once, not after ROUTE_CACHE_JIFFIES. `detail` (the counts) is
    logged but not compared: a routing daemon churning a large table would otherwise re-log the refusal
    and make every CPU re-copy its maps at each refresh."""
    exceptions: tuple[Network, ...] = ()
    probe: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    refused: str = "not proved"
    next_hop: str = ""
    detail: str = field(default="", compare=False)

    def packed(self) -> bytes:
        """struct route_back_family."""
        if self.refused:
            return bytes(_FAMILY.size)
        prefixes = b"".join(mapped(network.network_address) + _mask(network) for network in self.exceptions)
        return _FAMILY.pack(1, len(self.exceptions), mapped(self.probe), prefixes)


def _mask(network: Network) -> bytes:
    """The network's mask in the 16-byte form: an IPv4 one also fixes the ::ffff: prefix."""
    bits = network.prefixlen + (96 if network.version == 4 else 0)
    return ((1 << 128) - (1 << (128 - bits))).to_bytes(16, "big")


def prove(family: int, rules: list[Rule], routes: list[Route]) -> Proof:
    """What the kernel answers for any client address of `family`, given the namespace's rules and the
    routes of every table: one next hop outside the exceptions, or why that cannot be shown."""
    if not all(rule.plain for rule in rules) or len(rules) != len(DEFAULT_RULES[family]) or \
            {(rule.priority, rule.table) for rule in rules} != DEFAULT_RULES[family]:
        return Proof(refused="policy rules other than the kernel's default ones")
    consulted = [route for route in routes if route.table in {table for _, table in DEFAULT_RULES[family]}]
    defaults = [route for route in consulted if route.network.prefixlen == 0]
    if len(defaults) != 1 or defaults[0].table != MAIN_TABLE:
        return Proof(refused="not one default route, in the main table", detail=f"{len(defaults)} default routes")
    default = defaults[0]
    if not (default.unicast and default.via_gateway and default.plain):
        return Proof(refused="the default route is not a unicast route via one gateway")
    exceptions = tuple(ipaddress.collapse_addresses(route.network for route in consulted
                                                    if route.network.prefixlen))
    if len(exceptions) > MAX_EXCEPTIONS:
        return Proof(refused=f"more than {MAX_EXCEPTIONS} prefixes routed otherwise",
                     detail=f"{len(exceptions)} prefixes")
    probe = next((address for address in _probe_candidates(family)
                  if not any(address in network for network in exceptions)), None)
    if probe is None:
        return Proof(refused="no address left to the default route")
    return Proof(exceptions, probe, refused="", next_hop=default.next_hop)


def _probe_candidates(family: int):
    """Global unicast addresses, spread over the space: 1.0.0.1 ... 223.0.0.1; 2000::1 ... 3fff::1."""
    if family == 4:
        return (ipaddress.IPv4Address(f"{first}.0.0.1") for first in range(1, 224) if first != 127)
    return (ipaddress.IPv6Address(first << 112 | 1) for first in range(0x2000, 0x4000))


def _rule_of(message) -> Rule:
    names = {name for name, _ in message["attrs"]}
    plain = (not message["dst_len"] and not message["src_len"] and not message["tos"] and not message["flags"]
             and message["action"] == FR_ACT_TO_TBL and names <= _RULE_ATTRIBUTES
             and message.get_attr("FRA_SUPPRESS_PREFIXLEN") in (None, NO_SUPPRESS_PREFIXLEN))
    return Rule(message.get_attr("FRA_PRIORITY") or 0, message.get_attr("FRA_TABLE") or message["table"], plain)


def _route_of(family: int, message) -> Route:
    destination = message.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
    names = {name for name, _ in message["attrs"]}
    return Route(table=message.get_attr("RTA_TABLE") or message["table"],
                 network=ipaddress.ip_network(f"{destination}/{message['dst_len']}", strict=False),
                 unicast=message["type"] == rt_type["unicast"],
                 via_gateway=bool(names & {"RTA_GATEWAY", "RTA_VIA"}),
                 plain=not message["tos"] and not message["src_len"] and names <= _DEFAULT_ROUTE_ATTRIBUTES,
                 next_hop=f"{message.get_attr('RTA_GATEWAY') or message.get_attr('RTA_VIA')} dev {message.get_attr('RTA_OIF')}")


def route_count(family: int) -> int:
    """How many routes this namespace's tables hold, from the kernel's counters rather than a dump: the sum
    of every table's prefixes (/proc/net/fib_triestat), IPv6's route entries (/proc/net/rt6_stats, the
    fourth hexadecimal field)."""
    if family == 4:
        with open("/proc/thread-self/net/fib_triestat") as stats:
            return sum(int(line.split()[1]) for line in stats if line.strip().startswith("Prefixes:"))
    with open("/proc/thread-self/net/rt6_stats") as stats:
        return int(stats.read().split()[3], 16)


class RouteWatch:
    """This network namespace's proofs (the one it was made in: the programs' lookups are that
    namespace's), dumped again after any change a netlink group it listens to announced."""

    def __init__(self):
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                    socket.NETLINK_ROUTE)
        try:
            self.events.bind((0, 0))
            for group in _GROUPS:
                self.events.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            self.dumps = IPRoute()
        except BaseException:
            self.events.close()
            raise
        self.stale = True

    def changed(self) -> bool:
        """Whether the routing may have changed since the last proofs() (read the events first, then
        dump: a change during the dump is still queued for the next call). A full socket (ENOBUFS: events
        were lost) counts as a change."""
        while True:
            try:
                if not self.events.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
            self.stale = True
        return self.stale

    def proofs(self) -> dict[int, Proof]:
        """Both families' proofs, from a dump of the rules and every table's routes."""
        self.stale = False
        found = {}
        for family, address_family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                count = route_count(family)
                if count > MAX_ROUTES_READ:
                    found[family] = Proof(refused=f"more than {MAX_ROUTES_READ} routes to read", detail=f"{count} routes")
                    continue
                rules = [_rule_of(message) for message in self.dumps.get_rules(family=address_family)]
                routes = [_route_of(family, message) for message in self.dumps.get_routes(family=address_family)]
            except (OSError, NetlinkError, ValueError) as error:  # e.g. IPv6 disabled: lookups as before
                found[family] = Proof(refused=f"the routing dump failed: {error}")
                self.stale = True
                continue
            found[family] = prove(family, rules, routes)
        return found

    def close(self) -> None:
        self.events.close()
        self.dumps.close()
