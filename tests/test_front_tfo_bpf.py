"""The front programs' TCP Fast Open part under BPF_PROG_TEST_RUN, against the handler (as
tests/test_front_xdp.py, whose namespace and helpers it uses): a SYN asking for a TFO cookie gets the
handler's SYN-ACK byte for byte, cookie included, from the XDP and the tc program, for every TFO vector
and in both option forms; a SYN that carries a cookie gets the handler's decision: forwarded FASTOPEN
byte for byte (valid for the primary or the backup key, with data, within its source's budget), or the
handler's SYN-ACK, its fallback counted by reason."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import struct
import time

import pytest

from synproxy.bpf.loading import mapped, sized_map
from synproxy.encap import FLAG_FASTOPEN as ENCAP_FLAG_FASTOPEN
from synproxy.front.handler import (
    FASTOPEN_COOKIE_ISSUED,
    FASTOPEN_PER_SOURCE_BURST,
    FASTOPEN_PER_SOURCE_RATE,
    Action,
    FastOpenLimit,
    handle,
)
from synproxy.packet import build_fastopen_option, parse_tcp, parse_tcp_options
from synproxy.salt import SaltSchedule
from synproxy.tfo import derive_tfo_key, fastopen_cookie
from tests import test_front_xdp
from tests.lab_fixtures import needs_root
from tests.test_front_fastpath import PERIOD, PORT, set_clock, syn, without_clock
from tests.test_front_xdp import PASS, REDIRECT, assert_encapsulated, make_policy, run
from tests.test_tfo import TFO_VECTORS_FILE

pytestmark = needs_root
TFO_VECTORS = json.loads(TFO_VECTORS_FILE.read_text())
DAY = TFO_VECTORS["key_period_seconds"]
LINUX_OPTIONS = (("MSS", 1460), ("SAckOK", b""), ("Timestamp", (777, 0)), ("NOP", None), ("WScale", 7))
# its fixtures: the same two programs, one namespace
hook, namespace, link_mac = test_front_xdp.hook, test_front_xdp.namespace, test_front_xdp.link_mac
REQUEST = {False: (34, b""), True: (254, b"\xf9\x89")}  # scapy's (kind, data) of a cookie request


@pytest.fixture(scope="module")
def policy(cookie_vectors):
    return dataclasses.replace(make_policy(cookie_vectors["vectors"] + [{**v, "dport": PORT} for v in TFO_VECTORS["cookies"]]),
                               tfo_secret=bytes.fromhex(TFO_VECTORS["secret"]), tfo_key_period=DAY)


@pytest.fixture(scope="module")
def schedule(cookie_vectors):
    return SaltSchedule((bytes.fromhex(cookie_vectors["secret"]),), period=PERIOD, skew=2)


def within(key_period: int) -> float:
    return key_period * DAY + DAY / 2 + 0.25


def request_syn(src: str, dst: str, experimental: bool, options=LINUX_OPTIONS, **fields) -> bytes:
    return syn(src, dst, options=[*options, REQUEST[experimental]], **fields)


@pytest.mark.parametrize("experimental", [False, True], ids=["kind 34", "kind 254"])
def test_every_tfo_vectors_request_gets_the_handlers_syn_ack_and_cookie(hook, monkeypatch, namespace, fast_path,
                                                                       policy, schedule, experimental):
    # The program's clock counts nanoseconds in 64 bits (to the year 2262): the key periods past that
    # (2^32) are the handler's to check (tests/test_tfo.py).
    vectors = [v for v in TFO_VECTORS["cookies"] if (v["key_period"] + 1) * DAY * 10**9 < 2**63]
    assert {v["family"] for v in vectors} == {4, 6} and len(vectors) >= 8
    for vector in vectors:
        now = within(vector["key_period"])
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        frame = request_syn(vector["saddr"], vector["daddr"], experimental)
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        family = vector["family"]
        assert (verdict, changed) == (REDIRECT[hook], {("syn_answered", family): 1,
                                                       ("fastopen_cookie_issued", family): 1}), vector
        expected = handle(frame[14:], now, schedule, policy)
        assert expected.action is Action.REPLY and expected.fastopen == "requested"
        assert without_clock(out[14:]) == without_clock(expected.packet), vector
        option = parse_tcp_options(parse_tcp(out[14:]).raw_options).fastopen
        assert build_fastopen_option(option).hex() == vector["option_experimental" if experimental else "option"]


@pytest.mark.parametrize("options", [
    [("MSS", 1460), REQUEST[False]],
    [REQUEST[True], ("MSS", 1220), ("NOP", None), ("WScale", 14)],
    [REQUEST[False], REQUEST[True]],           # the last one read wins, as in the handler
    [REQUEST[True], REQUEST[False], ("EOL", None)],
    [("MSS", 1460), (254, b"\x12\x34"), REQUEST[False]],  # another experiment: ignored
], ids=["mss", "first", "both 34 last", "both 254 last", "other experiment"])
@pytest.mark.parametrize("family", [4, 6])
def test_requests_in_other_layouts_are_answered_as_the_handler_does(hook, monkeypatch, namespace, fast_path, policy,
                                                                   schedule, options, family):
    now = within(19_800)
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    source, vip = ("198.18.1.2", "198.19.0.10") if family == 4 else ("2001:db8:1::2", "2001:db8:ffff::10")
    frame = syn(source, vip, options=options)
    verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
    assert verdict == REDIRECT[hook] and changed[("fastopen_cookie_issued", family)] == 1
    assert without_clock(out[14:]) == without_clock(handle(frame[14:], now, schedule, policy).packet)


CLIENTS = {4: ("198.18.1.2", "198.19.0.10"), 6: ("2001:db8:1::2", "2001:db8:ffff::10")}
DATA = b"GET / HTTP/1.0\r\n\r\n"


def cookie_of(family: int, key_period: int) -> bytes:
    client, vip = CLIENTS[family]
    key = derive_tfo_key(bytes.fromhex(TFO_VECTORS["secret"]), key_period)
    return fastopen_cookie(key, ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed)


def budget_map(fast_path):
    return sized_map(fast_path.object, "fastopen_budget", 8)


def budget_key(family: int) -> bytes:
    return mapped(ipaddress.ip_address(CLIENTS[family][0]))


# (TFO option, data) and what the handler says of it: its Verdict.fastopen.
COOKIE_CASES = {
    "valid": (lambda f, p: (34, cookie_of(f, p)), DATA, "accepted"),
    "backup key": (lambda f, p: (34, cookie_of(f, p - 1)), DATA, "accepted"),
    "experimental": (lambda f, p: (254, b"\xf9\x89" + cookie_of(f, p)), DATA, "accepted"),
    "expired": (lambda f, p: (34, cookie_of(f, p - 2)), DATA, "invalid_cookie"),
    "invalid": (lambda f, p: (34, bytes(8)), DATA, "invalid_cookie"),
    "invalid experimental": (lambda f, p: (254, b"\xf9\x89" + bytes(8)), DATA, "invalid_cookie"),
    "4 bytes": (lambda f, p: (34, cookie_of(f, p)[:4]), DATA, "invalid_cookie"),
    "16 bytes": (lambda f, p: (34, cookie_of(f, p) * 2), DATA, "invalid_cookie"),
    "without data": (lambda f, p: (34, cookie_of(f, p)), b"", "no_data"),
    "too big": (lambda f, p: (34, cookie_of(f, p)), bytes(1452), "too_big"),
    "rate limited": (lambda f, p: (34, cookie_of(f, p)), DATA, "rate_limited"),
    "odd length": (lambda f, p: (34, bytes(5)), DATA, ""),    # ignored, as Linux does
    "18 bytes": (lambda f, p: (34, bytes(18)), DATA, ""),     # cancels the option, as Linux does
    "no TFO option": (lambda f, p: (1, b""), DATA, ""),       # a NOP: data in a plain SYN, ignored
}


@pytest.mark.parametrize("case", list(COOKIE_CASES))
@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_carrying_a_cookie_gets_the_handlers_decision(hook, monkeypatch, namespace, link_mac, fast_path,
                                                           policy, schedule, case, family):
    """Forwarded FASTOPEN (data and all) as the handler encapsulates it, or answered with its SYN-ACK
    (a fresh cookie in the form the client used), counted by why; each side's budget fresh, or both
    exhausted."""
    key_period = 19_800
    now = within(key_period)
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    make_option, data, result = COOKIE_CASES[case]
    frame = syn(*CLIENTS[family], options=[*LINUX_OPTIONS[:3], make_option(family, key_period)], payload=data)
    limit, budget = FastOpenLimit(), budget_map(fast_path)
    budget.delete(budget_key(family))
    if result == "rate_limited":
        for _ in range(FASTOPEN_PER_SOURCE_BURST):
            assert limit.take(ipaddress.ip_address(CLIENTS[family][0]).packed, now)
        budget.update(budget_key(family), struct.pack("=Q", time.monotonic_ns() + 10**10))  # empty for 10 s more
    expected = handle(frame[14:], now, schedule, policy, limit)
    assert expected.fastopen == result
    verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
    if result == "accepted":
        assert changed == {("fastopen_accepted", family): 1}
        assert_encapsulated(verdict, out, expected, link_mac, hook)
        assert out[14 + 28 + 1] == ENCAP_FLAG_FASTOPEN and out.endswith(DATA)
        return
    assert expected.action is Action.REPLY and verdict == REDIRECT[hook]
    assert without_clock(out[14:]) == without_clock(expected.packet)
    assert changed == {("syn_answered", family): 1, **({(f"fastopen_{result}", family): 1} if result else {}),
                       **({("fastopen_cookie_issued", family): 1} if result in FASTOPEN_COOKIE_ISSUED else {})}


def test_a_sources_budget_is_the_handlers_burst_then_its_rate(hook, monkeypatch, namespace, fast_path, policy,
                                                             schedule):
    now = within(19_800)
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    frame = syn(*CLIENTS[4], options=[*LINUX_OPTIONS[:3], (34, cookie_of(4, 19_800))], payload=DATA)
    budget_map(fast_path).delete(budget_key(4))
    started = time.monotonic()
    accepted = sum(run(namespace, fast_path, frame, hook=hook)[2].get(("fastopen_accepted", 4), 0)
                   for _ in range(FASTOPEN_PER_SOURCE_BURST + 5))
    refilled = int((time.monotonic() - started) * FASTOPEN_PER_SOURCE_RATE)
    assert FASTOPEN_PER_SOURCE_BURST <= accepted <= FASTOPEN_PER_SOURCE_BURST + refilled
    # Another source has its own budget.
    budget_map(fast_path).delete(budget_key(6))
    other = syn(*CLIENTS[6], options=[*LINUX_OPTIONS[:3], (34, cookie_of(6, 19_800))], payload=DATA)
    assert run(namespace, fast_path, other, hook=hook)[2] == {("fastopen_accepted", 6): 1}


def test_a_cookie_without_tfo_is_answered_without_one(hook, monkeypatch, namespace, fast_path, policy, schedule):
    now = within(19_800)
    disabled = dataclasses.replace(policy, tfo_secret=None)
    frame = syn(*CLIENTS[6], options=[*LINUX_OPTIONS[:3], (34, cookie_of(6, 19_800))], payload=DATA)
    try:
        set_clock(monkeypatch, fast_path, disabled, schedule, now)
        expected = handle(frame[14:], now, schedule, disabled, FastOpenLimit())
        assert expected.fastopen == "disabled"
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert (verdict, changed) == (REDIRECT[hook], {("syn_answered", 6): 1, ("fastopen_disabled", 6): 1})
        assert without_clock(out[14:]) == without_clock(expected.packet)
    finally:
        set_clock(monkeypatch, fast_path, policy, schedule, now)


def test_without_tfo_a_request_is_answered_without_a_cookie_and_a_late_key_leaves_it_to_the_queue(
        hook, monkeypatch, namespace, fast_path, policy, schedule):
    now = within(19_800)
    disabled = dataclasses.replace(policy, tfo_secret=None)
    frame = request_syn("198.18.1.2", "198.19.0.10", False)
    try:
        set_clock(monkeypatch, fast_path, disabled, schedule, now)
        verdict, out, changed = run(namespace, fast_path, frame, hook=hook)
        assert (verdict, changed) == (REDIRECT[hook], {("syn_answered", 4): 1})
        assert parse_tcp_options(parse_tcp(out[14:]).raw_options).fastopen is None
        assert without_clock(out[14:]) == without_clock(handle(frame[14:], now, schedule, disabled).packet)
        # The loader's key is the previous period's: the program cannot make today's cookie.
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        fast_path.refresh_fastopen_key(policy, now - DAY)
        assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {("queued", 4): 1})
    finally:
        fast_path.refresh_fastopen_key(policy, now)
