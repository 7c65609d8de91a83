"""Netlink queries through pyroute2 (never by parsing `ip` output)."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.rtnl import rt_type

MAIN_TABLE = 254  # RT_TABLE_MAIN


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured on this network namespace's interfaces."""
    with IPRoute() as ipr:
        return {ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr()}


def blackholed(addresses) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Those of ``addresses`` whose longest-prefix route in the main table is a blackhole.

    Read from a dump of the table: `ip route get` (RTM_GETROUTE) answers EINVAL for a blackholed
    destination, which does not tell it from other failures.
    """
    found = set()
    with IPRoute() as ipr:
        for family in (4, 6):
            wanted = [a for a in addresses if a.version == family]
            if not wanted:
                continue
            routes = []
            for msg in ipr.get_routes(family=socket.AF_INET if family == 4 else socket.AF_INET6,
                                      table=MAIN_TABLE):
                destination = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
                routes.append((ipaddress.ip_network(f"{destination}/{msg['dst_len']}"), msg["type"]))
            for address in wanted:
                matching = [(network.prefixlen, kind) for network, kind in routes if address in network]
                if matching and max(matching)[1] == rt_type["blackhole"]:
                    found.add(address)
    return found


def default_route_interfaces() -> tuple[str, ...]:
    """The interfaces this node's default routes (IPv4 and IPv6, every path of a multipath one) leave by:
    where its traffic comes in from and goes out to, so where a front's kernel data plane attaches."""
    indexes: list[int] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                if msg["dst_len"] != 0 or msg["type"] != rt_type["unicast"]:
                    continue
                hops = msg.get_attr("RTA_MULTIPATH") or [msg]
                for hop in hops:
                    index = hop.get_attr("RTA_OIF") if hop is msg else hop["oif"]
                    if index and index not in indexes:
                        indexes.append(index)
        return tuple(ipr.get_links(index)[0].get_attr("IFLA_IFNAME") for index in indexes)


def interface_kind(name: str) -> str | None:
    """The link's kind (veth, vxlan, bridge...), or None for a physical device."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        info = ipr.get_links(found[0])[0].get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None


def enable_gro(name: str) -> bool:
    """Turn the interface's GRO on (in this namespace); True when it was off. A veth has it off by default."""
    tool = Ethtool()
    try:
        features = tool.get_features(name)
        gro = features.features["rx-gro"]
        if gro.enable:
            return False
        gro.enable = True
        tool.set_features(name, features)
        return True
    finally:
        tool.close()


def global_ipv6_beside(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
    """A global IPv6 address of the interface holding ``address``: the IPv6 next hop a front announces
    beside its IPv4 session's (the router reaches both on that link)."""
    with IPRoute() as ipr:
        holders = [msg["index"] for msg in ipr.get_addr(family=socket.AF_INET)
                   if msg.get_attr("IFA_ADDRESS") == str(address)]
        if not holders:
            return None
        for msg in ipr.get_addr(family=socket.AF_INET6, index=holders[0]):
            candidate = ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS"))
            if msg["scope"] == 0 and not candidate.is_link_local:
                return candidate
    return None


def default_gateways() -> list[ipaddress.IPv4Address]:
    """The gateways of the IPv4 default route (every path of a multipath one): a front's BGP peers when
    front.bgp.peers is empty, as a top-of-rack router usually is both."""
    found: list[ipaddress.IPv4Address] = []
    with IPRoute() as ipr:
        for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if msg["dst_len"] != 0 or msg["type"] != rt_type["unicast"]:
                continue
            hops = msg.get_attr("RTA_MULTIPATH") or [msg]
            for hop in hops:
                gateway = hop.get_attr("RTA_GATEWAY")
                if gateway and ipaddress.IPv4Address(gateway) not in found:
                    found.append(ipaddress.IPv4Address(gateway))
    return found
