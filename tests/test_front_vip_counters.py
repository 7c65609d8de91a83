"""The front programs' per-VIP-and-port counters (synproxy_front_vip_packets_total) under BPF_PROG_TEST_RUN:
each SYN answered, handshake ACK validated and segment forwarded is counted once, under its own VIP and
port, by whichever program handled it, exactly as the program's own counters say; the loader keeps one
entry per configured pair across a reload.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

from synproxy.front.fastpath import VIP_PORT_SLOTS, FastPath
from synproxy.front.service import destination
from synproxy.packet import build_tcp_packet
from tests import test_front_xdp
from tests.lab_fixtures import needs_root
from tests.test_front_fastpath import PERIOD, PORT, VIP4, VIP6, random_options, set_clock, vector_syn
from tests.test_front_xdp import frame_of, run, usable, vector_ack

pytestmark = needs_root
# test_front_xdp's namespace (routes, a permanent neighbour), policy and schedule
namespace, policy, schedule = test_front_xdp.namespace, test_front_xdp.policy, test_front_xdp.schedule
KINDS = {"syn_answered": "syn_answered", "validated": "validated", "forwarded": "forwarded",
         "forwarded_bad_mac": "forwarded", "forwarded_expired_epoch": "forwarded"}


def counted(namespace: str, fast_path: FastPath, frame: bytes, hook: str) -> tuple[dict, dict]:
    """The program's own counters that moved, and the per-VIP counts that moved, for one frame."""
    before = fast_path.vip_port_counts()
    _, _, changed = run(namespace, fast_path, frame, hook=hook)
    after = fast_path.vip_port_counts()
    moved = {}
    for pair, values in after.items():
        for kind, delta in zip(("syn_answered", "validated", "forwarded"), (a - b for a, b in zip(values, before[pair]))):
            if delta:
                moved[(*pair, kind)] = delta
    return changed, moved


def test_every_handled_packet_is_counted_once_under_its_vip_and_port(monkeypatch, namespace, fast_path, policy,
                                                                    schedule, cookie_vectors):
    rng = random.Random(7)
    vectors = usable(cookie_vectors["vectors"])
    cases = []
    for vector in rng.sample(vectors, 40):
        now = vector["epoch"] * PERIOD + PERIOD / 2
        cases += [(now, vector_syn(vector, False), "xdp"), (now, vector_syn(vector, True), "tc"),
                  (now, vector_ack(vector), "xdp"), (now, vector_ack(vector, cookie_delta=1 << 12), "tc")]
    now = 29000000 * PERIOD + 1
    for _ in range(40):
        family = rng.choice((4, 6))
        src = f"198.18.7.{rng.randrange(1, 255)}" if family == 4 else f"2001:db8:1::{rng.randrange(1, 65536):x}"
        packet = build_tcp_packet(ipaddress.ip_address(src).packed,
                                  ipaddress.ip_address(VIP4 if family == 4 else VIP6).packed, rng.randrange(1, 65536),
                                  PORT, rng.randrange(2**32), rng.randrange(2**32), rng.randrange(256) & ~0x02,
                                  rng.randrange(65536), random_options(rng), b"x" * rng.randrange(100))
        cases.append((now, frame_of(packet), rng.choice(("xdp", "tc"))))
    seen = set()
    for now, frame, hook in cases:
        set_clock(monkeypatch, fast_path, policy, schedule, now)
        changed, moved = counted(namespace, fast_path, frame, hook)
        ((outcome, _family),) = changed
        vip, port = destination(frame[14:])  # the queue path's own reading of a packet's VIP and port
        expected = {(ipaddress.ip_address(vip), port, KINDS[outcome]): 1} if outcome in KINDS else {}
        assert moved == expected, (outcome, hook)
        seen.add(KINDS.get(outcome))
    assert {"syn_answered", "validated", "forwarded"} <= seen


def test_a_reload_keeps_the_kept_pairs_counts_and_a_returning_pair_starts_from_zero(
        monkeypatch, namespace, fast_path, policy, schedule, cookie_vectors):
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    set_clock(monkeypatch, fast_path, policy, schedule, vector["epoch"] * PERIOD + PERIOD / 2)
    pair = (ipaddress.ip_address(vector["daddr"]), vector["dport"])
    other_port = min(policy.ports - {vector["dport"]})
    run(namespace, fast_path, vector_syn(vector, False))
    answered = fast_path.vip_port_counts()[pair][0]
    assert answered >= 1
    assert set(fast_path.vip_port_counts()) == {(ipaddress.ip_address(vip), port) for vip in policy.vips
                                                for port in policy.ports}
    try:
        fast_path.configure(dataclasses.replace(policy, ports=frozenset({vector["dport"], other_port})), schedule)
        assert fast_path.vip_port_counts()[pair][0] == answered
        fast_path.configure(dataclasses.replace(policy, ports=frozenset({other_port})), schedule)
        assert pair not in fast_path.vip_port_counts()
        fast_path.configure(policy, schedule)
        assert fast_path.vip_port_counts()[pair] == (0, 0, 0)
    finally:
        fast_path.configure(policy, schedule)


def test_past_the_slots_a_pair_is_protected_but_not_counted(monkeypatch, namespace, fast_path, policy, schedule,
                                                            cookie_vectors, capsys):
    vector = next(v for v in usable(cookie_vectors["vectors"]) if v["family"] == 4)
    many = dataclasses.replace(policy, ports=frozenset(range(20000, 20000 + VIP_PORT_SLOTS)) | {vector["dport"]})
    try:
        fast_path.configure(many, schedule)
        assert '"event": "vip_port_counters_partial"' in capsys.readouterr().err
        set_clock(monkeypatch, fast_path, many, schedule, vector["epoch"] * PERIOD + PERIOD / 2)
        changed, moved = counted(namespace, fast_path, vector_syn(vector, False), "xdp")
        assert changed == {("syn_answered", 4): 1}
        pair = (ipaddress.ip_address(vector["daddr"]), vector["dport"])
        assert moved == ({} if pair not in fast_path.vip_port_counts() else {(*pair, "syn_answered"): 1})
        assert len({port for _, port in fast_path.vip_port_counts()}) == VIP_PORT_SLOTS
    finally:
        fast_path.configure(policy, schedule)
