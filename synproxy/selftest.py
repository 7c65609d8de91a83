"""A whole handshake through the sans-IO core with no network: SYN in, SYN-ACK out, ACK validated.

What `make demo` shows before a lab exists, and a quick check an operator can run on a new host.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable

from synproxy.cookie import Reject, SynOptions, check_cookie, make_cookie
from synproxy.packet import (
    ACK,
    SYN,
    build_tcp_options,
    build_tcp_packet,
    parse_tcp,
    parse_tcp_options,
)
from synproxy.salt import SaltSchedule

CLIENTS = {4: ("198.18.1.2", "198.19.0.10"), 6: ("2001:db8:1::2", "2001:db8:ffff::10")}


def run(say: Callable[[str], None]) -> int:
    schedule = SaltSchedule((os.urandom(32),))
    now = time.time()
    failures = 0
    for family, (client, vip) in CLIENTS.items():
        saddr, daddr = ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed
        syn = build_tcp_packet(saddr, daddr, 40000, 80, 123456, 0, SYN, 64240,
                               build_tcp_options(1460, 7, True, (1000, 0)))
        segment = parse_tcp(syn)
        offered = parse_tcp_options(segment.raw_options)
        epoch, salt = schedule.minting_salt(now)
        cookie = make_cookie(salt, epoch, segment.saddr, segment.daddr, segment.sport, segment.dport,
                             segment.seq, SynOptions(offered.mss, offered.wscale, offered.sack_permitted,
                                                     False))
        ack = parse_tcp(build_tcp_packet(saddr, daddr, 40000, 80, segment.seq + 1, cookie + 1, ACK, 502))
        result = check_cookie(schedule, now, ack.saddr, ack.daddr, ack.sport, ack.dport, ack.seq - 1,
                              ack.ack - 1)
        forged = check_cookie(schedule, now, ack.saddr, ack.daddr, ack.sport, ack.dport, ack.seq - 1,
                              ack.ack ^ 0x400)
        ok = isinstance(result, SynOptions) and isinstance(forged, Reject)
        failures += not ok
        say(f"IPv{family} {client}:40000 -> {vip}:80  cookie {cookie:#010x} (epoch {epoch})  "
            f"ACK -> {result}  forged ACK -> {forged.value if isinstance(forged, Reject) else forged}  "
            f"{'ok' if ok else 'FAILED'}")
    return 1 if failures else 0
