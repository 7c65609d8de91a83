"""Network-namespace plumbing for the lab and the tests: unique names, removal even on failure, veth links, and
running code or commands inside a namespace.

Sockets and netlink handles belong to the namespace of the thread that creates them, so entering a
namespace with :func:`inside` is enough to create a listener or a raw socket there from the test
process itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pyroute2 import NetNS, netns
from pyroute2.ethtool import Ethtool


def unique_name(prefix: str) -> str:
    """Unique per run, so two runs on one machine never share a namespace (kept short for ifnames)."""
    return f"{prefix}{os.getpid() % 10000}{secrets.token_hex(2)}"


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[tuple[str, ...]]:
    """Create the namespaces; remove them on exit, also when the body fails."""
    created = []
    try:
        for name in names:
            netns.create(name)
            created.append(name)
        yield names
    finally:
        for name in created:
            if name in netns.listnetns():
                netns.remove(name)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``name`` (sockets created here stay there)."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def link(namespace_a: str, ifname_a: str, namespace_b: str, ifname_b: str) -> None:
    """A veth pair between two namespaces, both ends and both loopbacks up."""
    with NetNS(namespace_a) as ns:
        ns.link("add", ifname=ifname_a, kind="veth", peer={"ifname": ifname_b, "net_ns_fd": namespace_b})
    for namespace, ifname in ((namespace_a, ifname_a), (namespace_b, ifname_b)):
        with NetNS(namespace) as ns:
            for name in (ifname, "lo"):
                ns.link("set", index=ns.link_lookup(ifname=name)[0], state="up")


def add_addresses(namespace: str, ifname: str, *networks: str) -> None:
    """Addresses in CIDR form; IPv6 ones skip duplicate detection so they are usable at once."""
    with NetNS(namespace) as ns:
        index = ns.link_lookup(ifname=ifname)[0]
        for network in networks:
            interface = ipaddress.ip_interface(network)
            extra = {"flags": 0x02} if interface.version == 6 else {}  # IFA_F_NODAD
            ns.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen,
                    **extra)


@contextlib.contextmanager
def routed_namespace(prefix: str) -> Iterator[str]:
    """A namespace of its own where a front's route lookups succeed: a veth (``<prefix>a`` and ``<prefix>b``)
    holding 10.99.0.1/24 and fd00:99::1/64, default routes via 10.99.0.2 and fd00:99::2, forwarding on.
    Yields its name; removed on exit."""
    name = unique_name(prefix)
    with namespaces(name):
        link(name, f"{prefix}a", name, f"{prefix}b")
        add_addresses(name, f"{prefix}a", "10.99.0.1/24", "fd00:99::1/64")
        add_route(name, "0.0.0.0/0", "10.99.0.2")
        add_route(name, "::/0", "fd00:99::2")
        write_sysctls(name, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        yield name


@contextlib.contextmanager
def connections_on_loopback(prefix: str, port: int, *pairs: tuple[str, str]) -> Iterator[tuple[str, dict[str, int]]]:
    """A namespace of its own, entered, holding a TCP connection from each (server, client) pair's client
    address to its server address and ``port`` over the loopback: BPF_PROG_TEST_RUN looks sockets up in the
    caller's namespace. Yields the namespace's name and each client's port."""
    name = unique_name(prefix)
    with namespaces(name), inside(name), contextlib.ExitStack() as sockets:
        run(name, ["ip", "link", "set", "lo", "up"])
        add_addresses(name, "lo", *(f"{address}/{ipaddress.ip_address(address).max_prefixlen}"
                                    for pair in pairs for address in pair))
        ports = {}
        for server, client in pairs:
            family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
            listener = sockets.enter_context(socket.create_server((server, port), family=family))
            connected = sockets.enter_context(socket.create_connection((server, port), source_address=(client, 0)))
            sockets.enter_context(listener.accept()[0])
            ports[client] = connected.getsockname()[1]
        yield name, ports


def set_tx_checksum_offload(namespace: str, ifname: str, enabled: bool) -> None:
    """Whether the interface leaves TCP/UDP checksums for the device to finish (a veth never does)."""
    with inside(namespace):
        tool = Ethtool()
        try:
            features = tool.get_features(ifname)
            features.features["tx-checksum-ip-generic"].enable = enabled
            tool.set_features(ifname, features)
        finally:
            tool.close()


def add_route(namespace: str, destination: str, gateway: str) -> None:
    with NetNS(namespace) as ns:
        ns.route("add", dst=destination, gateway=gateway)


def write_sysctls(namespace: str, settings: dict[str, str]) -> None:
    """/proc/sys/net follows the network namespace of the thread that opens it."""
    with inside(namespace):
        for key, value in settings.items():
            Path("/proc/sys", *key.split(".")).write_text(value)


def read_sysctl(namespace: str, key: str) -> str:
    with inside(namespace):
        return Path("/proc/sys", *key.split(".")).read_text().strip()


def pids_inside(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (by inode: /proc/PID/ns/net against /run/netns)."""
    try:
        target = os.stat(f"/run/netns/{name}").st_ino
    except FileNotFoundError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino == target:
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
    return found


def run(namespace: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside ``namespace`` and check it succeeded."""
    return subprocess.run(["ip", "netns", "exec", namespace, *argv], check=True, capture_output=True,
                          text=True, timeout=60, **kwargs)


def popen(namespace: str, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)
