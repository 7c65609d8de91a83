"""Hostile packets through the front's handler and the backend's BPF program: a defined verdict each.

Default runs are sized for `make test`; SYNPROXY_LONG=1 runs the long variants (10^6 packets each),
whose last results are in docs/threat-model.md.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import Counter

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from synproxy.backend.libbpf import prog_test_run
from synproxy.backend.loader import DataPlane, build_object, read_counters
from synproxy.front.handler import Action, FrontPolicy, handle
from synproxy.salt import SaltSchedule
from tests import hostile
from tests.lab_fixtures import needs_root

LONG = os.environ.get("SYNPROXY_LONG") == "1"
POLICY = FrontPolicy(vips=frozenset({hostile.VIP4, hostile.VIP6}), ports=frozenset({80}),
                     farm_address=bytes([198, 18, 10, 2]), backends=(bytes([198, 18, 20, 2]),), encap_port=6080,
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
    plane = DataPlane(build_object())
    try:
        plane.configure(6080, 7)
        plane.trust([ipaddress.ip_address("198.18.10.2")])
        plane.refresh_salts(SCHEDULE, time.time())
        before = read_counters(plane.counters, plane.kfunc_errors)
        verdicts = Counter()
        outer = raw(Ether() / IP(src="198.18.10.2", dst="198.18.20.2") / UDP(sport=5, dport=6080, chksum=0))
        for i, (_, packet) in enumerate(hostile.packets(count, seed=11)):
            header = bytes([0x5C, i & 1, 0, 0])  # half of them claim to be validated
            verdict, _ = prog_test_run(plane.prog_fd, outer + header + packet)
            verdicts[verdict] += 1
        after = read_counters(plane.counters, plane.kfunc_errors)
    finally:
        plane.close()
    changed = {name: after[name] - before[name] for name in after if name != "kfunc_errors"}
    print(f"\n{count} hostile encapsulated packets: verdicts {dict(verdicts)}, counters {changed}")
    assert set(verdicts) <= {0, 2}  # TC_ACT_OK or TC_ACT_SHOT, nothing else
    assert changed["created"] == 0 and changed["kfunc_failed"] == 0
    assert changed["decapsulated"] + changed["malformed"] == count
