"""Backend changes without broken connections (issue 14, Beamer's daisy chain), the Python reference:
weighted Maglev, the previous owner per slot and its window, drains, and what the front puts in the
encapsulation; the configuration keys that drive them. Each test failed before (no previous owner, no
weights, no drain)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import raw

from synproxy import encap
from synproxy.config import ConfigError, parse_config, write_secret
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.front.service import Front, build_policy
from synproxy.maglev import NO_FORMER_OWNERS, NO_OWNER, PreviousOwners, build_table, flow_hash
from synproxy.packet import parse_tcp
from tests.lab_fixtures import needs_root
from tests.test_front_handler import POLICY, SCHEDULE
from tests.test_front_service import BACKENDS, QueuedPacket, data, write_config

A, B, C, D = (ipaddress.ip_address(f"198.18.{20 + i}.2").packed for i in range(4))
NOW = 1.8e9
WINDOW = 100.0


def policy(backends, weights=(), draining=(), down=frozenset(), previous=None, now=0.0) -> FrontPolicy:
    """A policy as build_policy makes one, with its history following it at ``now`` (monotonic)."""
    built = dataclasses.replace(POLICY, backends=tuple(backends), weights=tuple(weights), draining=tuple(draining),
                                down=frozenset(down), previous=previous)
    if previous is not None:
        previous.follow(built.owner_table(), built.draining_table(), built.down, now)
    return built


def segment(sport: int, flags: str = "PA") -> bytes:
    return raw(IP(src="198.18.1.2", dst="198.19.0.10") / TCP(sport=sport, dport=80, flags=flags, seq=5, ack=7)
               / b"x")


def header_former(packet: bytes) -> bytes:
    return packet[32:40]


def former(previous: bytes, earlier: bytes = NO_OWNER) -> bytes:
    return previous + earlier


def named(owners: bytes) -> tuple[bytes, bytes]:
    return owners[:4], owners[4:]


def test_weights_share_the_table_in_proportion_and_all_ones_is_the_unweighted_table():
    names = ["a", "b", "c"]
    assert build_table(names, size=65537, weights=[1, 1, 1]) == build_table(names, size=65537)
    shares = Counter(build_table(names, size=65537, weights=[1, 2, 5]))
    assert [round(shares[i] / 65537 * 8, 2) for i in range(3)] == [1.0, 2.0, 5.0]


def test_a_weight_change_moves_only_a_part_of_the_table():
    before = build_table(["a", "b", "c"], size=65537)
    after = build_table(["a", "b", "c"], size=65537, weights=[1, 1, 2])
    moved = sum(x != y for x, y in zip(before, after))
    # c goes from a third to a half: at least a sixth of the slots must move to it; Maglev moves not much more.
    assert 65537 / 6 <= moved < 65537 / 6 * 1.4


def test_a_moved_slot_names_its_previous_owner_for_the_window_then_none():
    previous = PreviousOwners(WINDOW)
    first = policy([A, B], previous=previous, now=0.0)
    assert set(previous.owners) == {NO_FORMER_OWNERS}, "no change seen yet: nothing to chain to"
    second = policy([A, B, C], previous=previous, now=10.0)
    owners_before, owners_after = first.owner_table(), second.owner_table()
    moved = {slot for slot, (x, y) in enumerate(zip(owners_before, owners_after)) if x != y}
    # Maglev moves the added backend's share, and a few slots between the others.
    assert moved and sum(owners_after[slot] == C for slot in moved) > 0.95 * len(moved)
    assert all(previous.owners[slot] == (former(owners_before[slot]) if slot in moved else NO_FORMER_OWNERS)
               for slot in range(len(owners_after)))
    assert not previous.expire(10.0 + WINDOW - 1)
    assert previous.expire(10.0 + WINDOW + 1) and set(previous.owners) == {NO_FORMER_OWNERS}


def test_a_slot_moved_twice_within_the_window_names_both_former_owners_most_recent_first():
    """Connections made on the owner between two changes, and those older than both, stay reachable: the
    packets name the most recent former owner, then the oldest; each leaves when its window ends."""
    previous = PreviousOwners(WINDOW)
    first = policy([A, B, C], previous=previous, now=0.0)
    second = policy([A, B, C, D], previous=previous, now=1.0)  # D added: some slots of A, B, C move to D
    third = policy([A, B, C, D], weights=[1, 1, 1, 2], previous=previous, now=2.0)  # D's weight doubled
    tables = [table.owner_table() for table in (first, second, third)]
    twice = [slot for slot in range(len(tables[0]))
             if tables[0][slot] != tables[1][slot] != tables[2][slot] != tables[0][slot]]
    once = [slot for slot in range(len(tables[0])) if tables[0][slot] == tables[1][slot] != tables[2][slot]]
    assert twice and once
    assert all(previous.owners[slot] == former(tables[1][slot], tables[0][slot]) for slot in twice)
    assert all(previous.owners[slot] == former(tables[1][slot]) for slot in once)
    assert previous.expire(1.0 + WINDOW + 0.5)
    assert all(previous.owners[slot] == former(tables[1][slot]) for slot in twice)
    assert previous.expire(2.0 + WINDOW + 0.5) and set(previous.owners) == {NO_FORMER_OWNERS}


def test_the_labs_changes_in_a_row_keep_every_flow_reachable_where_it_started_and_where_it_went_next():
    """Added, removed, drained, reweighted, all within the window (tests/test_chain_lab.py's sequence): for
    every slot, the backend it had before the first change, and the one it had after each change, is its
    current owner or one its packets name, but for a slot's middle owners when it moved three times."""
    previous = PreviousOwners(WINDOW)
    owned = [[owner] for owner in policy([A, B, C], previous=previous, now=0.0).owner_table()]
    steps = [{"backends": [A, B, C, D]}, {"backends": [B, C, D]}, {"backends": [C, D], "draining": [(B, 1)]},
             {"backends": [C, D], "weights": [3, 1], "draining": [(B, 1)]}]
    for at, step in enumerate(steps, start=1):
        current = policy(previous=previous, now=float(at), **step).owner_table()
        for slot, owners in enumerate(owned):
            reachable = {current[slot], *named(previous.owners[slot])}
            assert owners[0] in reachable and owners[-1] in reachable, (at, slot)
            if owners[-1] != current[slot]:
                owners.append(current[slot])


def test_a_draining_backend_gets_no_new_flows_and_is_chained_to_for_as_long_as_it_drains():
    previous = PreviousOwners(WINDOW)
    before = policy([A, B, C], previous=previous, now=0.0)
    drained = policy([A, B], draining=[(C, 1)], previous=previous, now=1.0)
    assert C not in drained.owner_table()
    was_c = [slot for slot, owner in enumerate(before.owner_table()) if owner == C]
    assert all(previous.owners[slot] == former(C) for slot in was_c)
    previous.expire(1.0 + WINDOW * 10)  # long after the window: C is still draining, still chained to
    assert all(previous.owners[slot] == former(C) for slot in was_c)
    assert {owners for owners in previous.owners if owners != NO_FORMER_OWNERS} == {former(C)}
    policy([A, B], previous=previous, now=2000.0)  # C taken off the list once drained: no longer chained to
    assert set(previous.owners) == {NO_FORMER_OWNERS}


def test_a_backend_marked_down_is_never_chained_to():
    previous = PreviousOwners(WINDOW)
    before = policy([A, B, C], previous=previous, now=0.0)
    policy([A, B], down={C}, previous=previous, now=1.0)
    assert C in before.owner_table() and not any(C in named(owners) for owners in previous.owners)


def test_the_front_sends_a_moved_flow_to_its_new_owner_naming_the_previous_one_and_validated_alike():
    previous = PreviousOwners(WINDOW)
    first = policy([A, B], previous=previous, now=0.0)
    second = policy([A, B, C], previous=previous, now=1.0)
    flows = {sport: flow_hash(*(ipaddress.ip_address(a).packed for a in ("198.18.1.2", "198.19.0.10")), sport, 80,
                              POLICY.flow_key) for sport in range(20000, 23000)}
    moved = [sport for sport, flow in flows.items() if first.backend_for(flow) != second.backend_for(flow)]
    kept = [sport for sport in flows if sport not in moved]
    assert moved and kept
    for sport in moved[:50]:
        verdict = handle(segment(sport), NOW, SCHEDULE, second)
        assert verdict.action is Action.FORWARD
        assert verdict.packet[16:20] == C and second.backends[verdict.backend] == C
        assert header_former(verdict.packet) == former(first.backends[first.backend_for(flows[sport])])
        unwrapped = verdict.packet[encap.OVERHEAD:]
        assert verdict.packet == encap.encapsulate(unwrapped, parse_tcp(unwrapped),
                                                   second.farm_address, C, second.encap_port, flows[sport], False,
                                                   second.encap_key, header_former(verdict.packet))
    for sport in kept[:50]:
        assert header_former(handle(segment(sport), NOW, SCHEDULE, second).packet) == NO_FORMER_OWNERS


def write(tmp_path: Path, backends: str, front: str = "") -> str:
    write_secret(tmp_path / "secret.hex", b"\xab" * 32)
    return (f"vips: [198.19.0.10]\nports: [80]\nsecret_file: secret.hex\nbackends:\n{backends}\n"
            f"front:\n  farm_address: 198.18.10.2\n{front}")


def test_backends_take_weights_drain_and_down_and_policies_follow(tmp_path):
    text = write(tmp_path, "  - 198.18.20.2\n  - {address: 198.18.21.2, weight: 3}\n"
                           "  - address: 198.18.22.2\n    drain: true\n  - {address: 198.18.23.2, down: true}",
                 "  previous_table_seconds: 600\n")
    config = parse_config(text, tmp_path / "synproxy.yaml")
    assert [(str(e.address), e.weight, e.drain, e.down) for e in config.backend_entries] == [
        ("198.18.20.2", 1, False, False), ("198.18.21.2", 3, False, False), ("198.18.22.2", 1, True, False),
        ("198.18.23.2", 1, False, True)]
    assert len(config.backends) == 4 and config.front.previous_table_seconds == 600
    previous = PreviousOwners(1.0)
    built = build_policy(config, config.salt_schedule(), previous)
    assert (built.backends, built.weights, built.draining, built.down) == ((A, B), (1, 3), ((C, 1),), frozenset({D}))
    assert previous.window == 600
    shares = Counter(built.table)
    assert 2.8 < shares[1] / shares[0] < 3.2


@pytest.mark.parametrize("backends, front, error", [
    ("  - {address: 198.18.20.2, weight: 0}", "", r"synproxy.yaml:5: backends.weight: must be between 1 and 1000"),
    ("  - {address: 198.18.20.2, drain: yes please}", "", r"backends.drain: expected true or false"),
    ("  - {weight: 2}", "", r"synproxy.yaml:5: backends.address: required key is missing"),
    ("  - {address: 198.18.20.2, colour: red}", "", r"backends.colour: unknown key"),
    ("  - 198.18.20.2\n  - {address: 198.18.20.2, weight: 2}", "", r"backends: lists the same entry twice"),
    ("  - {address: 198.18.20.2, drain: true}", "", r"backends: every backend is draining or down"),
    ("  - {address: 198.18.20.2, drain: true, down: true}\n  - 198.18.21.2", "", r"either draining or down"),
    ("  - 198.18.20.2", "  previous_table_seconds: -1\n", r"front.previous_table_seconds: must be at least 0"),
])
def test_bad_backend_entries_are_one_line_errors(tmp_path, backends, front, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(write(tmp_path, backends, front), tmp_path / "synproxy.yaml")


@needs_root  # the front opens a raw socket
def test_the_nfqueue_front_names_former_owners_after_a_sighup_reload_and_not_with_a_zero_window(tmp_path):
    """The shell keeps the history across reloads (Front.load is what SIGHUP runs): after a backend is
    added, the packets of the flows it took name where they were."""
    added = "198.18.22.2"
    for window, expect_names in (("", True), ("  previous_table_seconds: 0\n", False)):
        front = Front(str(write_config(tmp_path, BACKENDS, window)))
        write_config(tmp_path, [*BACKENDS, added], window)
        front.load()
        named = Counter()
        for sport in range(30000, 30400):
            packet = QueuedPacket(data(4, sport=sport))
            front.on_packet(packet)
            destination, formers = packet.replacement[16:20], named_of(packet.replacement)
            named[str(ipaddress.ip_address(destination)), formers] += 1
        moved = {key: count for key, count in named.items() if key[0] == added}
        assert moved, named
        if expect_names:
            assert all(formers[0] in {ipaddress.ip_address(b).packed for b in BACKENDS} and formers[1] == NO_OWNER
                       for _, formers in moved)
            assert all(formers == (NO_OWNER, NO_OWNER) for (to, formers) in named if to != added)
        else:
            assert {formers for _, formers in named} == {(NO_OWNER, NO_OWNER)}


def named_of(packet: bytes) -> tuple[bytes, bytes]:
    return named(header_former(packet))
