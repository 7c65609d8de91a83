"""routes_back.prove: when the routing table shows that every client outside a few prefixes is routed to
one gateway, and every case where it cannot (the programs then look up each SYN's route back)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from synproxy import netns
from synproxy.front.routes_back import (
    DEFAULT_RULES,
    LOCAL_TABLE,
    MAIN_TABLE,
    MAX_EXCEPTIONS,
    MAX_ROUTES_READ,
    Proof,
    Route,
    RouteWatch,
    Rule,
    prove,
    route_count,
)


def rules(family: int) -> list[Rule]:
    return [Rule(priority, table, True) for priority, table in sorted(DEFAULT_RULES[family])]


def route(network: str, table: int = MAIN_TABLE, unicast: bool = True, via_gateway: bool = False,
          plain: bool = True) -> Route:
    return Route(table, ipaddress.ip_network(network), unicast, via_gateway, plain)


DEFAULT4 = Route(MAIN_TABLE, ipaddress.ip_network("0.0.0.0/0"), True, True, True, "10.99.0.2 dev 2")
DEFAULT6 = route("::/0", via_gateway=True)
# A front's usual tables: its subnet, its own addresses and loopback in the local table.
ROUTES4 = [DEFAULT4, route("10.99.0.0/24"), route("10.99.0.1/32", LOCAL_TABLE, unicast=False),
           route("10.99.0.255/32", LOCAL_TABLE, unicast=False), route("127.0.0.0/8", LOCAL_TABLE, unicast=False)]
ROUTES6 = [DEFAULT6, route("fd00:99::/64"), route("fe80::/64"), route("fd00:99::1/128", LOCAL_TABLE, unicast=False),
           route("ff00::/8", LOCAL_TABLE, unicast=False)]


def test_a_single_gateway_is_proved_with_the_other_routes_as_exceptions_covered_ones_merged():
    proof = prove(4, rules(4), ROUTES4)
    assert proof == Proof((ipaddress.ip_network("10.99.0.0/24"), ipaddress.ip_network("127.0.0.0/8")),
                          ipaddress.ip_address("1.0.0.1"), refused="", next_hop="10.99.0.2 dev 2")
    proof6 = prove(6, rules(6), ROUTES6)
    assert not proof6.refused and [str(n) for n in proof6.exceptions] == ["fd00:99::/64", "fe80::/64", "ff00::/8"]
    assert str(proof6.probe) == "2000::1"


def test_the_probe_lies_outside_every_exception():
    proof = prove(4, rules(4), [*ROUTES4, route("1.0.0.0/8", via_gateway=True), route("2.0.0.0/7")])
    assert str(proof.probe) == "4.0.0.1"


@pytest.mark.parametrize("case, family, rule_set, routes, reason", [
    ("a rule of its own", 4, [*rules(4), Rule(100, 100, True)], ROUTES4, "policy rules"),
    ("a rule with a selector", 4, [Rule(0, LOCAL_TABLE, True), Rule(32766, MAIN_TABLE, False),
                                   Rule(32767, 253, True)], ROUTES4, "policy rules"),
    ("the main rule removed", 6, [Rule(0, LOCAL_TABLE, True)], ROUTES6, "policy rules"),
    ("no default route", 4, rules(4), ROUTES4[1:], "not one default route"),
    ("two default routes (metrics)", 4, rules(4), [*ROUTES4, DEFAULT4], "not one default route"),
    ("a default route in the default table", 4, rules(4), [*ROUTES4, route("0.0.0.0/0", 253, via_gateway=True)],
     "not one default route"),
    ("a multipath default (or a nexthop object, an encapsulation, a TOS)", 6, rules(6),
     [route("::/0", via_gateway=True, plain=False), *ROUTES6[1:]], "not a unicast route via one gateway"),
    ("a default route without a gateway (every client on the link)", 4, rules(4),
     [route("0.0.0.0/0"), *ROUTES4[1:]], "not a unicast route via one gateway"),
    ("a blackhole default", 4, rules(4), [route("0.0.0.0/0", unicast=False), *ROUTES4[1:]], "not a unicast"),
    ("too many other routes", 4, rules(4),
     [*ROUTES4, *(route(f"198.{2 * n}.0.0/16") for n in range(MAX_EXCEPTIONS))], "more than 32"),
])
def test_no_proof_where_the_kernels_answer_could_differ(case, family, rule_set, routes, reason):
    proof = prove(family, rule_set, routes)
    assert reason in proof.refused, case
    assert proof.packed() == bytes(len(proof.packed())), case  # disabled: every SYN's own lookup


def test_a_refusal_that_only_counts_differently_is_the_same_proof():
    """Compared at every refresh: a different count must not re-log the refusal nor rewrite the programs' map."""
    many = [*ROUTES4, *(route(f"198.{2 * n}.0.0/16") for n in range(MAX_EXCEPTIONS))]
    fewer, more = prove(4, rules(4), many), prove(4, rules(4), [*many, route("197.0.0.0/16")])
    assert more == fewer and more.refused and (fewer.detail, more.detail) == ("34 prefixes", "35 prefixes")


def test_adjacent_routes_merge_into_one_exception():
    merged = prove(4, rules(4), [*ROUTES4, *(route(f"198.{n}.0.0/16") for n in range(MAX_EXCEPTIONS))])
    assert not merged.refused and ipaddress.ip_network("198.0.0.0/11") in merged.exceptions


def test_routes_of_tables_no_rule_consults_are_not_exceptions():
    assert prove(4, rules(4), [*ROUTES4, route("0.0.0.0/0", 100), route("192.0.2.0/24", 100)]).exceptions == \
        prove(4, rules(4), ROUTES4).exceptions


def test_the_packed_prefixes_are_the_programs_16_byte_forms():
    packed = prove(4, rules(4), ROUTES4).packed()
    assert packed[:8] == (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
    assert packed[8:24] == bytes(10) + b"\xff\xff" + bytes([1, 0, 0, 1])
    assert packed[24:56] == bytes(10) + b"\xff\xff" + bytes([10, 99, 0, 0]) + b"\xff" * 15 + b"\x00"


def test_a_namespace_with_more_routes_than_are_read_gets_no_proof_and_no_dump(monkeypatch):
    """A front holding a full table is not dumped into Python at every change its routing daemon makes:
    the kernel's counters say how many routes there are first."""
    with netns.routed_namespace("rb") as name, netns.inside(name):
        watch = RouteWatch()
        try:
            assert not watch.proofs()[4].refused
            commands = "".join(f"route add 10.{i // 256}.{i % 256}.0/24 via 10.99.0.3\n"
                               for i in range(MAX_ROUTES_READ + 1))
            netns.run(name, ["ip", "-batch", "-"], input=commands)
            assert route_count(4) > MAX_ROUTES_READ
            dump = watch.dumps.get_routes
            monkeypatch.setattr(watch.dumps, "get_routes", lambda family: pytest.fail("dumped")
                                if family == socket.AF_INET else dump(family=family))
            proofs = watch.proofs()
            assert f"more than {MAX_ROUTES_READ} routes to read" in proofs[4].refused
            assert not proofs[6].refused
        finally:
            watch.close()
