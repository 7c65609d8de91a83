"""Packet-filter rules the product installs for itself, in a chain of its own, removed on exit.

Fronts: in the raw table's PREROUTING, before connection tracking, traffic to the protected VIPs and
ports, and the ICMP errors to the VIPs a TCP acts on (handler._icmp_error), is untracked and queued to
NFQUEUE (with several workers, spread over their queues by the CPU that received the packet). There is
no --queue-bypass: when no front process is bound to a queue, or the queue is full, the kernel drops
the packets, so no SYN ever reaches a backend unanswered by a
cookie (fail closed).

Backends: VIP traffic is untracked both ways. A connection that bpf_sk_assign_tcp_reqsk created was
reset by the backend's kernel when connection tracking handled its packets (seen in Docker
containers, whose embedded DNS installs NAT rules); the stateless design needs no tracking there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from synproxy.config import IPAddress
from synproxy.packet import ICMP_ERROR_TYPES

_ICMP_MATCH = {4: ("icmp", "--icmp-type"), 6: ("ipv6-icmp", "--icmpv6-type")}


class FirewallError(RuntimeError):
    pass


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


class RawChain:
    """A chain in the raw table holding ``actions``, reached by one jump per VIP, port and hook."""

    def __init__(self, name: str, actions: list[list[str]], hooks: dict[str, tuple[str, str]],
                 icmp_errors: bool = False):
        self.name = name
        self.actions = actions
        self.hooks = hooks  # hook -> (address match, port match), e.g. "PREROUTING": ("-d", "--dport")
        self.icmp_errors = icmp_errors  # also one jump per VIP, hook and ICMP error type

    def _jumps(self, vips: Iterable[IPAddress], ports: Iterable[int]):
        for vip in vips:
            for port in ports:
                for hook, (address, port_match) in self.hooks.items():
                    yield _tool(vip), hook, [address, str(vip), "-p", "tcp", port_match, str(port), "-j", self.name]
            if self.icmp_errors:
                protocol, type_match = _ICMP_MATCH[vip.version]
                for hook, (address, _) in self.hooks.items():
                    for icmp_type in ICMP_ERROR_TYPES[vip.version]:
                        yield _tool(vip), hook, [address, str(vip), "-p", protocol, type_match, str(icmp_type),
                                                 "-j", self.name]

    def install(self, vips: tuple[IPAddress, ...], ports: tuple[int, ...]) -> None:
        """Create the chain and the jumps (after removing any left by a crashed run)."""
        self.remove(vips, ports)
        for tool in sorted({_tool(vip) for vip in vips}):
            self._create(tool)
        for tool, hook, rule in self._jumps(vips, ports):
            _run([tool, "-w", "-t", "raw", "-I", hook, *rule])

    def replace(self, old: tuple[tuple[IPAddress, ...], tuple[int, ...]],
                new: tuple[tuple[IPAddress, ...], tuple[int, ...]]) -> None:
        """Move from the ``old`` (VIPs, ports) to the ``new`` ones: jumps are added before any is removed and
        only the difference changes, so a VIP and port in both never loses its jump (a packet arriving in
        such a gap would not be queued: the front would lose it, the backend would track it)."""
        old_tools, new_tools = ({_tool(vip) for vip in vips} for vips, _ in (old, new))
        old_jumps, new_jumps = ([(tool, hook, tuple(rule)) for tool, hook, rule in self._jumps(*rules)]
                                for rules in (old, new))
        for tool in sorted(new_tools - old_tools):
            self._create(tool)
        for tool, hook, rule in new_jumps:
            if (tool, hook, rule) not in old_jumps:
                _run([tool, "-w", "-t", "raw", "-I", hook, *rule])
        for tool, hook, rule in old_jumps:
            if (tool, hook, rule) not in new_jumps:
                self._delete_jump(tool, hook, list(rule))
        for tool in sorted(old_tools - new_tools):
            self._delete(tool)

    def remove(self, vips: tuple[IPAddress, ...], ports: tuple[int, ...]) -> None:
        """Remove the jumps and the chain; absent ones are fine."""
        for tool, hook, rule in self._jumps(vips, ports):
            self._delete_jump(tool, hook, rule)
        for tool in sorted({_tool(vip) for vip in vips}):
            self._delete(tool)

    def _create(self, tool: str) -> None:
        """The chain with its actions; one left by a crashed run is emptied first."""
        _run([tool, "-w", "-t", "raw", "-N", self.name], check=False)
        _run([tool, "-w", "-t", "raw", "-F", self.name])
        for action in self.actions:
            _run([tool, "-w", "-t", "raw", "-A", self.name, *action])

    def _delete(self, tool: str) -> None:
        _run([tool, "-w", "-t", "raw", "-F", self.name], check=False)
        _run([tool, "-w", "-t", "raw", "-X", self.name], check=False)

    @staticmethod
    def _delete_jump(tool: str, hook: str, rule: list[str]) -> None:
        while _run([tool, "-w", "-t", "raw", "-D", hook, *rule], check=False):
            pass


def front_chain(queue_num: int, workers: int = 1) -> RawChain:
    """The front's chain: queue ``queue_num``, or with several workers the queues from ``queue_num`` on, one
    per worker, chosen by the receiving CPU (``--queue-cpu-fanout``: a flow that one CPU receives stays in
    one queue, in order, and each worker reads what one CPU's softirq queued)."""
    if workers == 1:
        target = ["--queue-num", str(queue_num)]
    else:
        target = ["--queue-balance", f"{queue_num}:{queue_num + workers - 1}", "--queue-cpu-fanout"]
    return RawChain(f"SYNPROXY-Q{queue_num}", [["-j", "CT", "--notrack"], ["-j", "NFQUEUE", *target]],
                    {"PREROUTING": ("-d", "--dport")}, icmp_errors=True)


def backend_chain() -> RawChain:
    return RawChain("SYNPROXY-BACKEND", [["-j", "CT", "--notrack"]],
                    {"PREROUTING": ("-d", "--dport"), "OUTPUT": ("-s", "--sport")})
