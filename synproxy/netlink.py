"""Netlink queries through pyroute2 (never by parsing `ip` output)."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute
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
