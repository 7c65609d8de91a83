"""TCP Fast Open through the lab with real Linux clients (docs/front.md, "TCP Fast Open"): a first
connection learns the farm's cookie from a front, the next one's data reaches the backend's application
in the SYN, through another front too; after a key rotation the previous key's cookie still opens, two
periods on it falls back; one source's flood of TFO SYNs beyond its budget falls back, counted,
without overflowing a backend's TFO queue or costing another client its TFO; and TFO SYNs within every
budget but beyond a backend's TFO queue are refused by its kernel and complete by the normal handshake,
costing another client nothing."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import time
from collections import Counter

import pytest

from synproxy import netns
from synproxy.front.handler import FASTOPEN_PER_SOURCE_BURST, FASTOPEN_PER_SOURCE_RATE
from synproxy.lab.first_byte import TCP_FASTOPEN_CONNECT, round_trips_to_first_byte, traced_request
from synproxy.lab.topology import ECHO_PORT, FRONT_METRICS_PORT, VIP, VIP6, scrape
from tests.lab_fixtures import needs_root, running_lab
from tests.test_tfo import netstat

pytestmark = [pytest.mark.netns, needs_root]
KEY_PERIOD = 60.0  # the shortest tfo.key_period_seconds: a rotation within the test's patience
VIPS = {4: VIP, 6: VIP6}
STEERED_PORTS = (44000, 44999)  # client ports the router sends to one front (Lab.steer_handshakes)
TIMEOUT = 5.0


_ports = itertools.count(STEERED_PORTS[0])
_steered_to: list[str] = []


@pytest.fixture(scope="module", params=["auto", "nfqueue"])
def lab(request):
    """The default data plane (the XDP program answers cookie requests and decides the SYNs that carry a
    cookie), and the NFQUEUE reference (the handler does everything)."""
    _steered_to.clear()
    with running_lab("tfo", salt_period_seconds=3.0, clock_skew_seconds=0.5, tfo_key_period_seconds=KEY_PERIOD,
                     data_plane=request.param) as lab:
        yield lab


def pinned_port(lab, front: str) -> int:
    """A client port not used before whose packets the router sends to ``front`` (the steered ports
    all go to the front steered to last)."""
    if _steered_to[-1:] != [front]:
        lab.steer_handshakes(STEERED_PORTS, syn_front=front, ack_front=front)
        _steered_to.append(front)
    port = next(_ports)
    assert port <= STEERED_PORTS[1]
    return port


def sent(lab, host: str, family: int, data: bytes, port: int = 0, address: str = "",
         fastopen: bool = True) -> socket.socket:
    """A connection from ``host`` (from ``address`` and ``port`` if given) to the VIP's echo server, by
    TCP_FASTOPEN_CONNECT (with a cached cookie the data rides in the SYN, else the SYN asks for one) or
    a plain connect, ``data`` sent."""
    with netns.inside(lab.ns(host)):
        sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    if fastopen:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port or address:
        sock.bind((address or ("0.0.0.0" if family == 4 else "::"), port))
    sock.connect((VIPS[family], ECHO_PORT))
    sock.sendall(data)
    return sock


def echoed(sock: socket.socket, length: int) -> bytes:
    """What came back on ``sock``, up to ``length`` bytes; the socket closed."""
    with sock:
        received = b""
        while len(received) < length and (chunk := sock.recv(65536)):
            received += chunk
        return received


def echo(lab, host: str, family: int, data: bytes, port: int = 0, address: str = "", fastopen: bool = True) -> bytes:
    """One connection to the VIP's echo server (sent's): what came back."""
    return echoed(sent(lab, host, family, data, port, address, fastopen), len(data))


def backends_tfo(lab) -> Counter:
    """The backends' TFO counters summed (TcpExtTCPFastOpen*, prefix removed)."""
    total = Counter()
    for host in lab.by_role("backend"):
        for name, value in netstat(lab.ns(host.name)).items():
            if name.startswith("TcpExtTCPFastOpen"):
                total[name.removeprefix("TcpExtTCPFastOpen")] += value
    return total


def fronts_tfo(lab) -> dict[str, Counter]:
    """Per front: cookies issued, accepted, and fallbacks by reason; and of those the BPF programs
    decided, "accepted by programs" and "<reason> by programs"."""
    counts = {}
    for host in lab.by_role("front"):
        counts[host.name] = mine = Counter()
        for (name, labels), value in scrape(lab, host.name, host.address, FRONT_METRICS_PORT).items():
            labels = dict(labels)
            if name == "synproxy_front_fastopen_cookies_issued_total":
                mine["issued"] += value
            elif name == "synproxy_front_fastopen_accepted_total":
                mine["accepted"] += value
            elif name == "synproxy_front_fastopen_fallbacks_total":
                mine[labels["reason"]] += value
            elif (name == "synproxy_front_kernel_packets_total" and labels["outcome"].startswith("fastopen_")
                  and labels["outcome"] != "fastopen_cookie_issued"):
                mine[f"{labels['outcome'].removeprefix('fastopen_')} by programs"] += value
    return counts


def by_programs(lab, decided: dict) -> dict:
    """The "by programs" counts of TFO SYNs ``decided`` (fronts_tfo's names): on the XDP data plane the
    programs decide them all, the queue none; with the NFQUEUE one, the handler all."""
    return {f"{name} by programs": value for name, value in decided.items()} if lab.data_plane == "auto" else {}


def moved(before, after) -> dict:
    if isinstance(before, Counter):
        return {key: after[key] - before[key] for key in after if after[key] != before[key]}
    return {name: moved(before[name], after[name]) for name in after}


def forget_cookies(lab, host: str) -> None:
    lab.run(host, ["ip", "tcp_metrics", "flush", "all"])


@pytest.mark.parametrize("family", [4, 6])
def test_the_cookie_one_front_hands_out_opens_a_fast_connection_through_another(lab, family):
    forget_cookies(lab, "client")
    within_one_key_period(5)
    front_before, backend_before = fronts_tfo(lab), backends_tfo(lab)
    assert echo(lab, "client", family, b"learn", pinned_port(lab, "front0")) == b"learn"
    learned = moved(front_before, fronts_tfo(lab))
    assert learned["front0"] == {"issued": 1} and not learned["front1"] and not learned["front2"], learned
    assert moved(backend_before, backends_tfo(lab)).get("Passive", 0) == 0

    front_before, backend_before = fronts_tfo(lab), backends_tfo(lab)
    assert echo(lab, "client", family, b"data in the SYN", pinned_port(lab, "front1")) == b"data in the SYN"
    fast = moved(front_before, fronts_tfo(lab))
    assert fast["front1"] == {"accepted": 1, **by_programs(lab, {"accepted": 1})}, fast
    assert not fast["front0"] and not fast["front2"], fast
    backend = moved(backend_before, backends_tfo(lab))
    assert backend.get("Passive") == 1 and not backend.get("PassiveFail"), backend


def wait_for_key_period(number: int) -> None:
    """Until a second into key period ``number`` (every node rotates within 0.25 s of its start)."""
    delay = number * KEY_PERIOD + 1 - time.time()
    assert delay < 3 * KEY_PERIOD
    time.sleep(max(0.0, delay))


def within_one_key_period(seconds: float) -> None:
    """Until the next ``seconds`` lie in one key period, a second or more past its start: a front mints
    cookies with a period's key at once (its programs leave TFO SYNs to the queue until their map has
    it), a backend's kernel has it once its loader installs it (within 0.25 s), and a TFO SYN with such a
    cookie in between is refused there (PassiveFail): the exact counts below would not hold."""
    period = math.floor(time.time() / KEY_PERIOD)
    into = time.time() - period * KEY_PERIOD
    if into < 1:
        wait_for_key_period(period)
    elif into > KEY_PERIOD - seconds:
        wait_for_key_period(period + 1)


def test_after_a_rotation_the_previous_keys_cookie_still_opens_and_two_periods_on_it_does_not(lab):
    """Two clients (the lab's client and attacker hosts: two addresses, two cookie caches) learn their
    cookie in one key period; in the next, one TFO connection opens with it (the backup key, on the
    front and on the backend); in the one after, the other's falls back to the cookie SYN-ACK, and its
    data arrives after the handshake."""
    for host in ("client", "attacker"):
        forget_cookies(lab, host)
    learned_in = math.floor(time.time() / KEY_PERIOD)
    if time.time() - learned_in * KEY_PERIOD > KEY_PERIOD - 5:  # too close to the rotation: learn after it
        learned_in += 1
        wait_for_key_period(learned_in)
    for host in ("client", "attacker"):
        assert echo(lab, host, 4, b"learn") == b"learn"
    assert math.floor(time.time() / KEY_PERIOD) == learned_in

    wait_for_key_period(learned_in + 1)
    front_before, backend_before = fronts_tfo(lab), backends_tfo(lab)
    assert echo(lab, "client", 4, b"backup key") == b"backup key"
    fronts = moved(front_before, fronts_tfo(lab))
    assert sum((Counter(front) for front in fronts.values()), Counter()) == {
        "accepted": 1, **by_programs(lab, {"accepted": 1})}, fronts
    backend = moved(backend_before, backends_tfo(lab))
    assert backend.get("Passive") == 1 and backend.get("PassiveAltKey") == 1, backend

    wait_for_key_period(learned_in + 2)
    front_before, backend_before = fronts_tfo(lab), backends_tfo(lab)
    assert echo(lab, "attacker", 4, b"expired") == b"expired"
    fronts = moved(front_before, fronts_tfo(lab))
    assert sum((Counter(front) for front in fronts.values()), Counter()) == {
        "invalid_cookie": 1, "issued": 1, **by_programs(lab, {"invalid_cookie": 1})}, fronts
    assert moved(backend_before, backends_tfo(lab)).get("Passive", 0) == 0


FLOOD = 80


def test_one_source_beyond_its_budget_falls_back_and_starves_no_one(lab):
    """One address (the client host) opens FLOOD TFO connections through one front as fast as it can:
    the front forwards at most its budget (FASTOPEN_PER_SOURCE_BURST, then _RATE a second), the rest
    fall back counted `rate_limited`, and every connection still delivers its data. The backends' TFO
    queues never overflow, and another address's TFO connection right after still opens in its SYN."""
    forget_cookies(lab, "client")
    within_one_key_period(5)
    assert echo(lab, "client", 4, b"learn", pinned_port(lab, "front0")) == b"learn"
    front_before, backend_before = fronts_tfo(lab), backends_tfo(lab)
    started = time.monotonic()
    for index in range(FLOOD):
        data = f"flood {index}".encode()
        assert echo(lab, "client", 4, data, pinned_port(lab, "front0")) == data
    elapsed = time.monotonic() - started
    front0 = moved(front_before, fronts_tfo(lab))["front0"]
    budget = FASTOPEN_PER_SOURCE_BURST + FASTOPEN_PER_SOURCE_RATE * elapsed
    assert FASTOPEN_PER_SOURCE_BURST <= front0["accepted"] <= budget + 1, (front0, elapsed)
    assert front0["rate_limited"] == FLOOD - front0["accepted"] and front0["issued"] == front0["rate_limited"], front0
    assert front0 == {**front0, **by_programs(lab, {"accepted": front0["accepted"],
                                                    "rate_limited": front0["rate_limited"]})}, front0
    backend = moved(backend_before, backends_tfo(lab))
    assert backend.get("Passive") == front0["accepted"] and not backend.get("ListenOverflow"), backend

    forget_cookies(lab, "attacker")
    assert echo(lab, "attacker", 4, b"learn") == b"learn"
    backend_before = backends_tfo(lab)
    assert echo(lab, "attacker", 4, b"not starved") == b"not starved"
    assert moved(backend_before, backends_tfo(lab)).get("Passive") == 1
    print(f"flood: {FLOOD} TFO SYNs in {elapsed:.2f} s from one source: {front0['accepted']} forwarded, "
          f"{front0['rate_limited']} fell back")


BACKEND_QUEUE = 1   # the backends' echo listeners' TFO queue (TCP_FASTOPEN qlen) in the next test
# A listener may make more TFO connections than its queue holds, one more per other CPU: the kernel reads
# the queue's length without a lock (tcp_fastopen_queue_check) and counts a connection only once it has
# made it (tcp_fastopen_create_child), so TFO SYNs that reach it on two CPUs at once can both pass. On the
# NFQUEUE data plane each front's process re-injects the SYNs it forwards, on its own CPU; on the XDP one
# the whole path runs in the client's softirq, one CPU.
RACING_CPUS = os.cpu_count() or 1
# Client addresses, each opening PER_SOURCE TFO connections at once. The client's kernel caches TFO
# cookies in its TCP metrics, hashed by destination alone, 6 entries a chain (TCP_METRICS_RECLAIM_DEPTH):
# with 8 sources to one VIP, 28 of 64 SYNs asked for a cookie again.
SOURCES = 4
PER_SOURCE = 16     # within every front's budget for one address (FASTOPEN_PER_SOURCE_BURST)


@contextlib.contextmanager
def echo_fastopen_queue(lab, length: int):
    """The backends' Python servers restarted with TFO queues ``length`` long, their own after."""
    backends = [host.name for host in lab.by_role("backend")]
    try:
        for name in backends:
            lab.stop_process(f"{name}-servers")
            lab.start_servers(name, fastopen_queue=length)
        yield
    finally:
        for name in backends:
            lab.stop_process(f"{name}-servers")
            lab.start_servers(name)


@contextlib.contextmanager
def client_addresses(lab, count: int):
    """``count`` more addresses on the client host, in its link's network (the router reaches them)."""
    client = next(host for host in lab.hosts if host.name == "client")
    addresses = [f"198.18.{client.link}.{100 + index}" for index in range(count)]
    try:
        for address in addresses:
            lab.run("client", ["ip", "address", "add", f"{address}/24", "dev", "eth0"])
        yield addresses
    finally:
        for address in addresses:
            lab.run("client", ["ip", "address", "del", f"{address}/24", "dev", "eth0"], check=False)


@contextlib.contextmanager
def bare_acks_held(lab, host: str):
    """``host``'s bare ACKs to the echo port dropped (iptables OUTPUT) until the block ends. In the lab a
    whole round trip runs in the sender's softirq, before its next SYN leaves, so a TFO connection never
    waits for its client's ACK; held back, they wait as over a real path: the TFO queue fills."""
    rule = ["OUTPUT", "-p", "tcp", "-d", VIP, "--dport", str(ECHO_PORT), "--tcp-flags", "ALL", "ACK",
            "-m", "length", "--length", "40:60", "-j", "DROP"]
    lab.run(host, ["iptables", "-I", *rule])
    try:
        yield
    finally:
        lab.run(host, ["iptables", "-D", *rule], check=False)


def backend_netstat(lab) -> dict[str, Counter]:
    return {host.name: Counter(netstat(lab.ns(host.name))) for host in lab.by_role("backend")}


def test_tfo_syns_beyond_a_backends_queue_complete_by_the_normal_handshake(lab):
    """SOURCES addresses open PER_SOURCE TFO connections each at once (no budget is the limit: every
    front forwards them all) to backends whose TFO queue holds BACKEND_QUEUE: each backend's kernel
    creates that many TFO connections (one more per CPU that raced it: RACING_CPUS) and refuses TFO for
    the rest (TCPFastOpenListenOverflow), whose SYN it answers with a normal SYN-ACK; the client's ACK
    and its data again reach the request socket through the fronts unflagged (not a cookie ACK) and
    every connection delivers its data. No accept
    queue overflows, no kernel SYN cookie is sent, and another client's plain connection meanwhile
    succeeds."""
    forget_cookies(lab, "client")
    with echo_fastopen_queue(lab, BACKEND_QUEUE), client_addresses(lab, SOURCES) as sources:
        within_one_key_period(5)  # from the cookies learned to the last TFO SYN: well under a second
        for address in sources:
            assert echo(lab, "client", 4, b"learn", address=address) == b"learn"
        front_before, netstat_before = fronts_tfo(lab), backend_netstat(lab)
        with bare_acks_held(lab, "client"):
            flood = []
            for index in range(PER_SOURCE):
                for address in sources:
                    data = f"tfo {address} {index} ".encode().ljust(64, b".")  # longer than a held bare ACK
                    flood.append((data, sent(lab, "client", 4, data, address=address)))
            assert echo(lab, "attacker", 4, b"plain, not starved", fastopen=False) == b"plain, not starved"
            assert [echoed(sock, len(data)) for data, sock in flood] == [data for data, _ in flood]
        fronts = moved(front_before, fronts_tfo(lab))
        backends = moved(netstat_before, backend_netstat(lab))
    forwarded = SOURCES * PER_SOURCE
    assert sum((Counter(front) for front in fronts.values()), Counter()) == {
        "accepted": forwarded, **by_programs(lab, {"accepted": forwarded})}, fronts
    tfo = {name: {key.removeprefix("TcpExtTCPFastOpen"): value for key, value in counters.items()
                  if key.startswith("TcpExtTCPFastOpen")} for name, counters in backends.items()}
    assert sum(sum(counters.values()) for counters in tfo.values()) == forwarded, tfo
    for name, counters in backends.items():
        passive = tfo[name].get("Passive", 0)
        assert BACKEND_QUEUE <= passive < BACKEND_QUEUE + RACING_CPUS, tfo
        assert tfo[name] == {"Passive": passive, "ListenOverflow": sum(tfo[name].values()) - passive}, tfo
        for refused in ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtSyncookiesSent"):
            assert not counters.get(refused), (name, counters)
    print(f"beyond the backends' TFO queues ({BACKEND_QUEUE} each): {forwarded} TFO SYNs forwarded, "
          f"the backends' TcpExtTCPFastOpen* moved {tfo}")


def test_a_request_in_the_syn_gets_its_first_byte_one_round_trip_sooner(lab):
    """The time to first byte in round trips, from a packet trace on the client: 2 with a plain
    handshake (SYN / SYN-ACK, then request / response), 1 with TFO (the request rides in the SYN): in
    the lab a round trip is well under a millisecond, so the count, not the time, is the figure."""
    forget_cookies(lab, "client")
    trips = {}
    for name, fastopen in (("plain", False), ("learning", True), ("tfo", True)):
        trace = traced_request(lab, fastopen, pinned_port(lab, "front2")).trace
        trips[name] = round_trips_to_first_byte(trace)
        direction, flags, payload = trace[0]
        assert direction == "out" and flags & 0x02, trace  # the SYN
        assert (payload > 0) == (name == "tfo"), trace      # the request in it, with a cookie
    assert trips == {"plain": 2, "learning": 2, "tfo": 1}, trips
    assert any(direction == "in" and payload for direction, _, payload in trace), trace  # it was answered
    print(f"round trips to the first byte: {trips}")
