"""The front programs' TCP Fast Open part under BPF_PROG_TEST_RUN, against the handler (as
tests/test_front_xdp.py, whose namespace and helpers it uses): a SYN asking for a TFO cookie gets the
handler's SYN-ACK byte for byte, cookie included, from the XDP and the tc program, for every TFO vector
and in both option forms; every SYN that carries a cookie, or a TFO option in another form, is left to
the queue, where the handler checks the cookie, holds the per-source budget and forwards it."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import pytest

from synproxy.front.handler import Action, handle
from synproxy.packet import build_fastopen_option, parse_tcp, parse_tcp_options
from synproxy.salt import SaltSchedule
from synproxy.tfo import derive_tfo_key, fastopen_cookie
from tests import test_front_xdp
from tests.lab_fixtures import needs_root
from tests.test_front_fastpath import PERIOD, PORT, set_clock, syn, without_clock
from tests.test_front_xdp import PASS, REDIRECT, make_policy, run
from tests.test_tfo import TFO_VECTORS_FILE

pytestmark = needs_root
TFO_VECTORS = json.loads(TFO_VECTORS_FILE.read_text())
DAY = TFO_VECTORS["key_period_seconds"]
LINUX_OPTIONS = (("MSS", 1460), ("SAckOK", b""), ("Timestamp", (777, 0)), ("NOP", None), ("WScale", 7))
hook, namespace = test_front_xdp.hook, test_front_xdp.namespace  # its fixtures: the same two programs, one namespace
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


def valid_cookie(family: int, now: float) -> bytes:
    client, vip = ("198.18.1.2", "198.19.0.10") if family == 4 else ("2001:db8:1::2", "2001:db8:ffff::10")
    key = derive_tfo_key(bytes.fromhex(TFO_VECTORS["secret"]), int(now // DAY))
    return fastopen_cookie(key, ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed)


@pytest.mark.parametrize("case", ["valid with data", "valid without data", "invalid", "experimental",
                                  "odd length", "too long"])
@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_carrying_a_cookie_or_another_tfo_form_is_left_to_the_queue(hook, monkeypatch, namespace, fast_path,
                                                                         policy, schedule, case, family):
    """The handler decides: forwarded FASTOPEN, or answered with a fresh cookie (or, odd or too long,
    read as Linux reads it). The program does not check cookies."""
    now = within(19_800)
    set_clock(monkeypatch, fast_path, policy, schedule, now)
    cookie = valid_cookie(family, now)
    option = {"invalid": (34, bytes(8)), "experimental": (254, b"\xf9\x89" + cookie), "odd length": (34, bytes(5)),
              "too long": (34, bytes(18))}.get(case, (34, cookie))
    source, vip = ("198.18.1.2", "198.19.0.10") if family == 4 else ("2001:db8:1::2", "2001:db8:ffff::10")
    frame = syn(source, vip, options=[*LINUX_OPTIONS[:3], option],
                payload=b"GET / HTTP/1.0\r\n\r\n" if case == "valid with data" else b"")
    assert run(namespace, fast_path, frame, hook=hook) == (PASS[hook], frame, {("queued", family): 1})
    expected = handle(frame[14:], now, schedule, policy).fastopen
    assert expected == {"valid with data": "rate_limited",  # without the shell's budget; with it: accepted
                        "valid without data": "no_data", "experimental": "no_data", "odd length": "",
                        "too long": ""}.get(case, "invalid_cookie")


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
