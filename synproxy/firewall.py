"""The front's packet-filter rules: queue traffic to the protected VIPs and ports, remove them on exit.

Rules live in a chain of their own (one per queue number) in the raw table's PREROUTING, before
connection tracking, which is switched off for these packets (the front keeps no state, nor should
the kernel for it). There is no --queue-bypass: when no front process is bound, or the queue is full,
the kernel drops the packets, so no SYN ever reaches a backend unanswered by a cookie (fail closed).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from synproxy.config import IPAddress


class FirewallError(RuntimeError):
    pass


def chain_name(queue_num: int) -> str:
    return f"SYNPROXY-Q{queue_num}"


def _tool(address: IPAddress) -> str:
    return "iptables" if address.version == 4 else "ip6tables"


def _run(args: list[str], check: bool = True) -> bool:
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise FirewallError(f"{args[0]} not found: install the iptables package") from None
    if check and done.returncode:
        raise FirewallError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.returncode == 0


def _jump_rules(vips: Iterable[IPAddress], ports: Iterable[int], queue_num: int):
    for vip in vips:
        for port in ports:
            yield _tool(vip), ["-d", str(vip), "-p", "tcp", "--dport", str(port), "-j", chain_name(queue_num)]


def install(vips: tuple[IPAddress, ...], ports: tuple[int, ...], queue_num: int) -> None:
    """Create the chain and the jumps (after removing any left by a crashed run)."""
    remove(vips, ports, queue_num)
    chain = chain_name(queue_num)
    for tool in sorted({_tool(vip) for vip in vips}):
        _run([tool, "-w", "-t", "raw", "-N", chain])
        _run([tool, "-w", "-t", "raw", "-A", chain, "-j", "CT", "--notrack"])
        _run([tool, "-w", "-t", "raw", "-A", chain, "-j", "NFQUEUE", "--queue-num", str(queue_num)])
    for tool, rule in _jump_rules(vips, ports, queue_num):
        _run([tool, "-w", "-t", "raw", "-I", "PREROUTING", *rule])


def remove(vips: tuple[IPAddress, ...], ports: tuple[int, ...], queue_num: int) -> None:
    """Remove the jumps and the chain; absent ones are fine."""
    for tool, rule in _jump_rules(vips, ports, queue_num):
        while _run([tool, "-w", "-t", "raw", "-D", "PREROUTING", *rule], check=False):
            pass
    for tool in sorted({_tool(vip) for vip in vips}):
        _run([tool, "-w", "-t", "raw", "-F", chain_name(queue_num)], check=False)
        _run([tool, "-w", "-t", "raw", "-X", chain_name(queue_num)], check=False)
