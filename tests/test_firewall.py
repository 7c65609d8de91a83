"""The product's packet-filter rules: a reload moves the jumps without a gap for what it keeps.

The commands RawChain runs are replayed against a model of the raw table (chains and the rules in each
hook), checking after every command that each kept VIP and port is still jumped to; then the same
reload runs against the real iptables of a namespace of its own. The backend's untracked traffic
is checked in a namespace where connection tracking runs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess

import pytest

from synproxy import firewall
from synproxy.netns import add_addresses, add_route, inside, link, namespaces, unique_name

V4, V6 = ipaddress.ip_address("198.19.0.10"), ipaddress.ip_address("2001:db8:ffff::10")
OLD = ((V4, V6), (80, 7))
NEW = ((V4,), (80, 443))  # keeps V4:80, drops V4:7 and all of V6, adds V4:443


class RawTable:
    """Just enough of iptables' semantics: -N/-F/-X/-A on chains, -I/-D of rules in a hook."""

    def __init__(self):
        self.chains: dict[tuple[str, str], list] = {}
        self.hooks: dict[tuple[str, str], list] = {}
        self.watch: list[tuple[str, str, tuple]] = []

    def run(self, args: list[str], check: bool = True) -> bool:
        tool, command, target, rule = args[0], args[4], args[5], tuple(args[6:])
        chain, hook = (tool, target), self.hooks.setdefault((tool, target), [])
        if command == "-N":
            ok = chain not in self.chains
            self.chains.setdefault(chain, [])
        elif command == "-F":
            ok = chain in self.chains and not self.chains[chain].clear()
        elif command == "-X":
            ok = chain in self.chains and not any(r[-1] == target for (owner, _), rules in self.hooks.items()
                                                  if owner == tool for r in rules)
            if ok:
                del self.chains[chain]
        elif command == "-A":
            ok = chain in self.chains and not self.chains[chain].append(rule)
        elif command == "-I":
            ok = (tool, rule[-1]) in self.chains and not hook.insert(0, rule)
        else:  # -D
            ok = rule in hook and not hook.remove(rule)
        if check and not ok:
            raise firewall.FirewallError(" ".join(args))
        for tool_, hook_, kept in self.watch:
            assert kept in self.hooks.get((tool_, hook_), []), f"{kept} missing after {' '.join(args)}"
            assert self.chains.get((tool_, kept[-1])), f"chain emptied after {' '.join(args)}"
        return ok


@pytest.mark.parametrize("chain", [firewall.front_chain(3), firewall.backend_chain()], ids=["front", "backend"])
def test_a_reload_never_leaves_a_kept_vip_and_port_without_its_jump(monkeypatch, chain):
    table = RawTable()
    monkeypatch.setattr(firewall, "_run", table.run)
    chain.install(*OLD)
    kept = [(tool, hook, tuple(rule)) for tool, hook, rule in chain._jumps((V4,), (80,))]
    table.watch = kept
    chain.replace(OLD, NEW)
    wanted = {(tool, hook, tuple(rule)) for tool, hook, rule in chain._jumps(*NEW)}
    assert {(tool, hook, rule) for (tool, hook), rules in table.hooks.items() for rule in rules} == wanted
    assert set(table.chains) == {("iptables", chain.name)}


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables in a namespace needs root")
def test_the_same_reload_on_the_real_raw_table():
    chain = firewall.front_chain(3)
    with namespaces(unique_name("spfw")) as (namespace,), inside(namespace):
        chain.install(*OLD)
        chain.replace(OLD, NEW)
        v4, v6 = (subprocess.run([tool, "-w", "-t", "raw", "-S"], check=True, capture_output=True, text=True).stdout
                  for tool in ("iptables", "ip6tables"))
        # The ICMP errors to the VIP a TCP acts on are queued too (handler._icmp_error), and kept.
        assert sorted(line for line in v4.splitlines() if "-j SYNPROXY-Q3" in line) == sorted([
            *(f"-A PREROUTING -d {V4}/32 -p tcp -m tcp --dport {port} -j SYNPROXY-Q3" for port in (443, 80)),
            *(f"-A PREROUTING -d {V4}/32 -p icmp -m icmp --icmp-type {kind} -j SYNPROXY-Q3" for kind in (3, 11))])
        assert "SYNPROXY" not in v6
        chain.install(*OLD)
        v6 = subprocess.run(["ip6tables", "-w", "-t", "raw", "-S"], check=True, capture_output=True, text=True).stdout
        assert sorted(line for line in v6.splitlines() if "icmp" in line) == [
            f"-A PREROUTING -d {V6}/128 -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j SYNPROXY-Q3" for kind in (1, 2, 3)]
        chain.remove(*OLD)


def test_one_worker_reads_one_queue_and_several_share_out_by_cpu():
    assert firewall.front_chain(3).actions[-1] == ["-j", "NFQUEUE", "--queue-num", "3"]
    # No --queue-bypass either way: a queue without its worker drops (fail closed).
    assert firewall.front_chain(3, workers=4).actions[-1] == [
        "-j", "NFQUEUE", "--queue-balance", "3:6", "--queue-cpu-fanout"]


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables in a namespace needs root")
def test_the_kernel_takes_the_rule_that_shares_out_the_queues():
    chain = firewall.front_chain(3, workers=2)
    with namespaces(unique_name("spfw")) as (namespace,), inside(namespace):
        chain.install(*OLD)
        rules = subprocess.run(["iptables", "-w", "-t", "raw", "-S", chain.name], check=True, capture_output=True,
                               text=True).stdout
        assert "-j NFQUEUE --queue-balance 3:4 --queue-cpu-fanout" in rules and "bypass" not in rules
        chain.remove(*OLD)


def _nft_json(*args: str) -> list[dict]:
    return json.loads(subprocess.run(["nft", "-j", *args], check=True, capture_output=True, text=True).stdout)["nftables"]


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables and nftables in a namespace need root")
def test_the_backend_s_vip_traffic_stays_untracked_where_connection_tracking_runs():
    """What the rules are for (a kfunc connection was reset under conntrack, in Docker): with a NAT table
    loading conntrack in the namespace, a connection to a protected VIP and port is untracked both ways,
    one to another port is tracked. (A cheaper form of these rules must keep this; benchmarks/README.md,
    "Connection rate", measured what they cost.)"""
    protected, other = 80, 81
    # Each port's packets by connection-tracking state: to it at prerouting, from it (the server's) at output.
    states = ("untracked", "new", "established")
    counted = {(hook, port, state): f"tcp {match} {port} ct state {state}"
               for hook, match in (("prerouting", "dport"), ("output", "sport"))
               for port in (protected, other) for state in states}
    counters = "".join(f"  counter {hook}_{port}_{state} {{}}\n" for hook, port, state in counted)
    chains = "".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority filter;\n"
        + "".join(f"    {match} counter name {hook}_{port}_{state}\n"
                  for (hook_, port, state), match in counted.items() if hook_ == hook) + "  }\n"
        for hook in ("prerouting", "output"))
    server_ns, client_ns = unique_name("spfws"), unique_name("spfwc")
    with namespaces(server_ns, client_ns):
        link(server_ns, "eth0", client_ns, "eth0")
        add_addresses(server_ns, "eth0", "10.99.0.1/24")
        add_addresses(server_ns, "lo", f"{V4}/32")
        add_addresses(client_ns, "eth0", "10.99.0.2/24")
        add_route(client_ns, f"{V4}/32", "10.99.0.1")
        with inside(server_ns):
            subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
                "table ip nat {\n chain postrouting { type nat hook postrouting priority srcnat; }\n}\n"
                f"table inet seen {{\n{counters}{chains}}}\n"))
            firewall.backend_chain().install((V4,), (protected,))
            servers = [socket.create_server((str(V4), port)) for port in (protected, other)]
        try:
            for server in servers:
                with inside(client_ns):
                    client = socket.create_connection(server.getsockname(), timeout=2)
                with client, server.accept()[0] as accepted:
                    client.sendall(b"x")
                    assert accepted.recv(1) == b"x"
                    accepted.sendall(b"y")
                    assert client.recv(1) == b"y"
        finally:
            for server in servers:
                server.close()
        with inside(server_ns):
            seen = {item["counter"]["name"]: item["counter"]["packets"] for item in _nft_json("list", "counters")
                    if "counter" in item}
            for hook in ("prerouting", "output"):
                assert seen[f"{hook}_{protected}_untracked"] >= 2, seen
                assert seen[f"{hook}_{protected}_new"] == seen[f"{hook}_{protected}_established"] == 0, seen
                assert seen[f"{hook}_{other}_untracked"] == 0, seen
                assert seen[f"{hook}_{other}_new"] + seen[f"{hook}_{other}_established"] >= 2, seen
