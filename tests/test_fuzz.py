"""Hostile packets through the front's handler and the backend's BPF program: a defined verdict each.

Default runs are sized for `make test`; SYNPROXY_LONG=1 runs the long variants (10^6 packets each),
whose last results are in docs/threat-model.md.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import Counter

from scapy.layers.l2 import Ether
from scapy.packet import raw

from synproxy.backend.loader import DataPlane, read_counters
from synproxy.bpf.libbpf import prog_test_run
from synproxy.bpf.loading import build_object
from synproxy.encap import encap_key
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.salt import SaltSchedule
from tests import hostile
from tests.lab_fixtures import needs_root

LONG = os.environ.get("SYNPROXY_LONG") == "1"
POLICY = FrontPolicy(vips=frozenset({hostile.VIP4, hostile.VIP6}), ports=frozenset({80}),
                     farm_address=bytes([198, 18, 10, 2]), backends=(bytes([198, 18, 20, 2]),), encap_port=6080,
                     encap_key=encap_key(b"z" * 32),
                     flow_key=b"f" * 16)
SCHEDULE = SaltSchedule((b"z" * 32,))


def test_front_handler_gives_every_hostile_packet_a_defined_verdict():
    count = 1_000_000 if LONG else 100_000
    outcomes: dict[str, Counter] = {kind: Counter() for kind in hostile.KINDS}
    now = time.time()
    started = time.perf_counter()
    for kind, packet in hostile.packets(count):
        verdict = handle(packet, now, SCHEDULE, POLICY)
        assert verdict.action in Action
        outcomes[kind][verdict.outcome] += 1
    elapsed = time.perf_counter() - started
    print(f"\n{count} hostile packets through the handler in {elapsed:.1f} s "
          f"({1e6 * elapsed / count:.1f} µs each)")
    for kind, counted in outcomes.items():
        print(f"  {kind:26} {dict(counted.most_common(4))}")
    assert all(sum(c.values()) >= count // len(hostile.KINDS) for c in outcomes.values())
    # The kinds that can never be a valid SYN or handshake ACK must never be answered or validated.
    for kind in ("truncated_ip", "truncated_tcp", "ihl_out_of_range", "data_offset_out_of_range", "fragment",
                 "bad_flag_combination", "other_port", "not_tcp", "option_length_bad"):
        assert not outcomes[kind]["syn_answered"] and not outcomes[kind]["validated"], kind
    assert outcomes["random_ack"]["validated"] <= 3  # p = 2^-22 per ACK
    assert set(outcomes["wrong_tcp_checksum"]) <= {"malformed_bad_checksum", "forwarded_bad_mac",
                                                   "forwarded_expired_epoch"}


@needs_root
def test_backend_program_gives_every_hostile_encapsulated_packet_a_defined_verdict():
    count = 1_000_000 if LONG else 30_000
    plane = DataPlane(build_object("backend"))
    try:
        plane.configure(POLICY.encap_port, 7)
        plane.trust([ipaddress.ip_address(POLICY.farm_address)])
        plane.protect([ipaddress.ip_address(hostile.VIP4), ipaddress.ip_address(hostile.VIP6)], POLICY.ports)
        plane.refresh_encap_keys(SCHEDULE)
        plane.refresh_salts(SCHEDULE, time.time())
        before = read_counters(plane.counters, plane.kfunc_errors)
        verdicts: dict[bool, Counter] = {True: Counter(), False: Counter()}  # by genuine MAC
        ether = raw(Ether(type=0x0800))
        for _, genuine, packet in hostile.encapsulations(count, POLICY.encap_key, POLICY.farm_address,
                                                         POLICY.backends[0], POLICY.encap_port):
            verdict, _ = prog_test_run(plane.prog_fd, ether + packet)
            verdicts[genuine][verdict] += 1
        after = read_counters(plane.counters, plane.kfunc_errors)
    finally:
        plane.close()
    changed = {name: after[name] - before[name] for name in after if name != "kfunc_errors"}
    print(f"\n{count} hostile encapsulated packets: verdicts (genuine MAC) {dict(verdicts[True])}, "
          f"(random MAC) {dict(verdicts[False])}; counters {changed}")
    assert set(verdicts[True]) <= {0, 2}  # TC_ACT_OK or TC_ACT_SHOT, nothing else
    assert set(verdicts[False]) == {2}, "a random MAC passes with p = 2^-64"
    assert changed["created"] == 0 and changed["kfunc_failed"] == 0
    assert sum(changed[name] for name in ("decapsulated", "malformed", "encap_bad_mac", "encap_refused")) == count
    # Of the genuine ones only TCP non-SYNs to a protected VIP and port are decapsulated.
    assert 0 < changed["decapsulated"] < sum(verdicts[True].values())
