"""Netlink queries through pyroute2 (never by parsing `ip` output)."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute


def local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address configured on this network namespace's interfaces."""
    with IPRoute() as ipr:
        return {ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr()}
