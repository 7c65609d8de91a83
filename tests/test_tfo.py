"""TCP Fast Open across the farm (docs/cookie.md, "TCP Fast Open"): the keys, and the cookie checked
against the Linux kernel itself — a real TFO client and listener in namespaces this test makes, the
SYN-ACK's cookie captured on the client's side."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synproxy import encap, netns
from synproxy.backend.loader import install_fastopen_keys
from synproxy.front.handler import (
    FASTOPEN_COOKIE_ISSUED,
    FASTOPEN_PER_SOURCE_BURST,
    FASTOPEN_PER_SOURCE_RATE,
    Action,
    FastOpenLimit,
    FrontPolicy,
    handle,
)
from synproxy.lab.first_byte import ETH_P_ALL, TCP_FASTOPEN_CONNECT
from synproxy.maglev import flow_hash
from synproxy.packet import (
    ACK,
    SYN,
    FastOpen,
    MalformedPacket,
    TcpSegment,
    build_fastopen_option,
    build_tcp_options,
    build_tcp_packet,
    parse_tcp,
    parse_tcp_options,
)
from synproxy.salt import SaltSchedule, derive_salt
from synproxy.tfo import derive_tfo_key, fastopen_cookie, fastopen_keys, sysctl_key_value
from tests import test_startup_errors as startup
from tests.vectors import generate

TFO_VECTORS_FILE = Path(generate.__file__).with_name("tfo.json")

SERVER_PORT = 8080
ADDRESSES = generate.TUPLES  # family: (client, server), as in the vectors, so the kernel can check them
PREFIX = {4: 15, 6: 32}      # one on-link network holds both
TIMEOUT = 5.0


def test_keys_come_from_the_secret_and_the_key_period_only():
    secret = bytes(range(32))
    day = 86400
    primary, backup = fastopen_keys(secret, 1000 * day + 5, day)
    assert (primary, backup) == (derive_tfo_key(secret, 1000), derive_tfo_key(secret, 999))
    assert fastopen_keys(secret, 1001 * day - 0.001, day) == (primary, backup)
    assert fastopen_keys(secret, 1001 * day, day) == (derive_tfo_key(secret, 1001), primary)
    assert len(primary) == 16 and primary != backup
    assert derive_tfo_key(b"x" * 32, 1000) != primary
    # Its own info string: never the cookie salt of the same number.
    assert primary != derive_salt(secret, 1000)


def test_the_sysctl_value_is_the_kernels_printed_form():
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert sysctl_key_value((key,)) == "33221100-77665544-bbaa9988-ffeeddcc"
    assert sysctl_key_value((key, bytes(16))) == "33221100-77665544-bbaa9988-ffeeddcc,00000000-00000000-00000000-00000000"


def test_the_vectors_are_what_the_code_makes():
    assert TFO_VECTORS_FILE.read_text() == generate.render(generate.build_tfo_document())


@pytest.fixture(scope="module")
def pair():
    """A client and a server namespace joined by a veth, both families; the server allows TFO."""
    client, server = netns.unique_name("tfoc"), netns.unique_name("tfos")
    with netns.namespaces(client, server):
        netns.link(client, "veth0", server, "veth0")
        for family, (client_address, server_address) in ADDRESSES.items():
            netns.add_addresses(client, "veth0", f"{client_address}/{PREFIX[family]}")
            netns.add_addresses(server, "veth0", f"{server_address}/{PREFIX[family]}")
        netns.write_sysctls(server, {"net.ipv4.tcp_fastopen": "3"})
        # The client's SYNs, captured for the front's handler, carry whole checksums (a veth leaves them partial).
        netns.set_tx_checksum_offload(client, "veth0", False)
        yield client, server


@contextlib.contextmanager
def listener(server: str, family: int, dual_stack: bool = False):
    """A TFO listener (setsockopt TCP_FASTOPEN, as an application enables it) on the server address, or
    on `::` for both families."""
    with netns.inside(server):
        sock = socket.socket(socket.AF_INET if family == 4 and not dual_stack else socket.AF_INET6,
                             socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
        sock.bind(("::" if dual_stack else ADDRESSES[family][1], SERVER_PORT))
        sock.listen(16)
        sock.settimeout(TIMEOUT)
        yield sock


@contextlib.contextmanager
def capture(client: str):
    """Every packet on the client's veth, from the IP header on (SOCK_DGRAM strips Ethernet)."""
    with netns.inside(client):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    with sock:
        sock.bind(("veth0", 0))
        sock.settimeout(0.2)
        yield sock


def captured_segments(capture_socket: socket.socket, family: int) -> Iterator[tuple[bytes, TcpSegment]]:
    """The TCP packets of ``family`` the capture sees, for TIMEOUT at most."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = capture_socket.recv(65535)
        except TimeoutError:
            continue
        if data and data[0] >> 4 == family:
            with contextlib.suppress(MalformedPacket):  # neighbour discovery, ICMP
                yield data, parse_tcp(data)


def syn_ack_fastopen(capture_socket: socket.socket, family: int, client_port: int) -> FastOpen | None:
    """The TFO option of the server's SYN-ACK to ``client_port``."""
    server = ipaddress.ip_address(ADDRESSES[family][1]).packed
    for _, segment in captured_segments(capture_socket, family):
        if segment.saddr == server and segment.dport == client_port and segment.flags & (SYN | ACK) == SYN | ACK:
            return parse_tcp_options(segment.raw_options).fastopen
    raise AssertionError(f"no SYN-ACK to port {client_port} within {TIMEOUT} s")


def fastopen_connect(client: str, family: int, data: bytes) -> socket.socket:
    """A client connection by TCP_FASTOPEN_CONNECT: with a cached cookie, ``data`` rides in the SYN;
    without one, the SYN asks for a cookie and the data follows the handshake."""
    with netns.inside(client):
        sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
    sock.connect((ADDRESSES[family][1], SERVER_PORT))
    sock.sendall(data)
    return sock


def netstat(namespace: str) -> dict[str, int]:
    """TcpExt counters of ``namespace`` (/proc/thread-self/net follows this thread's namespace)."""
    with netns.inside(namespace):
        lines = Path("/proc/thread-self/net/netstat").read_text().splitlines()
    counters = {}
    for names, values in zip(lines[::2], lines[1::2]):
        prefix, *keys = names.split()
        counters.update({prefix.rstrip(":") + key: int(value) for key, value in zip(keys, values.split()[1:])})
    return counters


def exchange(pair, family: int, data: bytes, listening: socket.socket) -> tuple[FastOpen | None, dict[str, int]]:
    """One client connection sending ``data``: the SYN-ACK's TFO option and how the server's TFO counters moved."""
    client, server = pair
    before = netstat(server)
    with capture(client) as captured, fastopen_connect(client, family, data) as connection:
        option = syn_ack_fastopen(captured, family, connection.getsockname()[1])
        accepted, _ = listening.accept()
        with accepted:
            accepted.settimeout(TIMEOUT)
            assert accepted.recv(100) == data
    after = netstat(server)
    moved = {name.removeprefix("TcpExtTCPFastOpen"): after[name] - before[name]
             for name in after if name.startswith("TcpExtTCPFastOpen")}
    return option, moved


def forget_cookies(client: str) -> None:
    netns.run(client, ["ip", "tcp_metrics", "flush", "all"])


@pytest.mark.parametrize("family, dual_stack", [(4, False), (6, False), (4, True)])
def test_the_kernel_makes_the_cookie_we_compute_for_its_primary_key(pair, family, dual_stack):
    """Also on a dual-stack listener, where an IPv4 client's cookie still covers the 4-byte addresses."""
    client, server = pair
    primary, backup = os.urandom(16), os.urandom(16)
    netns.write_sysctls(server, {"net.ipv4.tcp_fastopen_key": sysctl_key_value((primary, backup))})
    assert netns.read_sysctl(server, "net.ipv4.tcp_fastopen_key") == sysctl_key_value((primary, backup))
    forget_cookies(client)
    client_address, server_address = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])
    expected = fastopen_cookie(primary, client_address, server_address)
    with listener(server, family, dual_stack) as listening:
        option, moved = exchange(pair, family, b"first", listening)
        assert option == FastOpen(expected, False)
        assert moved["CookieReqd"] == 1 and moved["Passive"] == 0
        assert expected != fastopen_cookie(backup, client_address, server_address)
        # The client cached it: its next SYN carries the cookie and the data, which the server accepts.
        option, moved = exchange(pair, family, b"second", listening)
        assert option is None and moved["Passive"] == 1 and moved["PassiveFail"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_a_cookie_asked_for_in_the_experimental_form_comes_back_in_it(pair, family):
    """Linux answers kind 254 + 0xF989 in kind, and the cookie is the same; our parser reads both."""
    client, server = pair
    primary = os.urandom(16)
    netns.write_sysctls(server, {"net.ipv4.tcp_fastopen_key": sysctl_key_value((primary,))})
    client_address, server_address = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])
    client_port = 40000 + family
    syn = build_tcp_packet(client_address, server_address, client_port, SERVER_PORT, 1000, 0, SYN, 64240,
                           build_tcp_options(1460, 7, True, None, FastOpen(b"", True)))
    with netns.inside(client):
        sender = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW,
                               socket.IPPROTO_RAW)
    with sender, listener(server, family), capture(client) as captured:
        sender.sendto(syn, (ADDRESSES[family][1], 0))
        option = syn_ack_fastopen(captured, family, client_port)
    assert option == FastOpen(fastopen_cookie(primary, client_address, server_address), True)


@pytest.mark.parametrize("family", [4, 6])
def test_the_backend_installs_the_farm_keys_and_rotates_them_in_step(pair, family):
    """What the backend loader writes is what a real client's cookie is made with; after one rotation
    the previous key still opens TFO connections, two periods on it no longer does."""
    client, server = pair
    secret, period = os.urandom(32), 86400.0
    start = 1000 * period + 1
    client_address, server_address = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])

    def cookie(key_period: int) -> FastOpen:
        return FastOpen(fastopen_cookie(derive_tfo_key(secret, key_period), client_address, server_address), False)

    def install(now: float) -> bool:
        with netns.inside(server):
            return install_fastopen_keys(secret, period, now)

    netns.write_sysctls(server, {"net.ipv4.tcp_fastopen": "1"})  # a namespace's default: client only
    forget_cookies(client)
    assert install(start)
    assert netns.read_sysctl(server, "net.ipv4.tcp_fastopen") == "3"
    assert not install(start + period - 2)  # same period: nothing to write
    with listener(server, family) as listening:
        option, moved = exchange(pair, family, b"learn", listening)
        assert option == cookie(1000) and moved["Passive"] == 0
        option, moved = exchange(pair, family, b"fast", listening)
        assert option is None and moved["Passive"] == 1

        assert install(start + period)  # rotation: 1001 primary, 1000 backup
        option, moved = exchange(pair, family, b"backup key", listening)
        assert moved["Passive"] == 1 and moved["PassiveAltKey"] == 1 and moved["PassiveFail"] == 0
        assert option == cookie(1001)  # the client is handed the primary's cookie along the way

        assert install(start + 3 * period)  # 1001's cookie is two periods old: refused, data after the handshake
        option, moved = exchange(pair, family, b"expired", listening)
        assert moved["Passive"] == 0 and moved["PassiveFail"] == 1
        assert option == cookie(1003)


@pytest.mark.parametrize("family", [4, 6])
def test_the_vectors_cookies_are_the_kernels(pair, family):
    """The vectors' own keys installed in a kernel: its SYN-ACKs carry the vectors' cookies and options."""
    client, server = pair
    vectors = json.loads(TFO_VECTORS_FILE.read_text())
    schedule = vectors["schedule"][1]
    netns.write_sysctls(server, {"net.ipv4.tcp_fastopen_key": schedule["sysctl"]})
    primary = next(v for v in vectors["cookies"] if v["family"] == family and v["key"] == schedule["primary"])
    assert (primary["saddr"], primary["daddr"]) == ADDRESSES[family]
    forget_cookies(client)
    with listener(server, family) as listening:
        option, _ = exchange(pair, family, b"vector", listening)
    assert build_fastopen_option(option).hex() == primary["option"]


def test_a_backend_that_cannot_write_the_keys_refuses_to_start_in_one_line(tmp_path):
    """As in a container, where /proc/sys is read-only: before anything is installed."""
    read_only_proc_sys = ("unshare", "--mount", "sh", "-c",
                          "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"",
                          "sh")
    config = startup.write_config(tmp_path, "backend:\n  interface: lo\ntfo:\n  enabled: true\n")
    with netns.namespaces(netns.unique_name("tfor")) as (namespace,):
        result = startup.synproxy(namespace, "backend", "--config", str(config), prefix=read_only_proc_sys)
        startup.assert_one_line(result, "cannot install the TCP Fast Open keys", "tfo.enabled")
        assert "SYNPROXY" not in startup.raw_rules(namespace)


def front_policy(family: int, tfo_secret: bytes | None) -> FrontPolicy:
    return FrontPolicy(vips=frozenset({ipaddress.ip_address(ADDRESSES[family][1]).packed}),
                       ports=frozenset({SERVER_PORT}), farm_address=bytes([198, 18, 10, 2]),
                       backends=(bytes([198, 18, 20, 2]),), encap_port=6080, encap_key=bytes(16), flow_key=bytes(16),
                       tfo_secret=tfo_secret, tfo_key_period=86400.0)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("offered, answered", [
    (None, None),                                        # no TFO option: none back (Linux ignores one unasked)
    (FastOpen(b"", False), False),                       # a request
    (FastOpen(b"", True), True),                         # a request in the experimental form: answered in kind
    (FastOpen(bytes(8), False), False),                  # a cookie not accepted (yet): the valid one instead
])
def test_the_front_hands_a_syn_that_asks_the_backends_cookie(family, offered, answered):
    secret, now = bytes(range(32)), 19_801 * 86400.0 + 7
    client_address, server_address = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])
    syn = build_tcp_packet(client_address, server_address, 40000, SERVER_PORT, 1000, 0, SYN, 64240,
                           build_tcp_options(1460, 7, True, (5, 0), offered))
    for tfo_secret in (secret, None):
        verdict = handle(syn, now, SaltSchedule((b"f" * 32,)), front_policy(family, tfo_secret))
        assert verdict.action is Action.REPLY and verdict.outcome == "syn_answered"
        options = parse_tcp_options(parse_tcp(verdict.packet).raw_options)
        timestamp = (int(now * 1000) & 0xFFFFFFFF, 5)
        assert options[:4] == (front_policy(family, None).announced_mss(family), 7, True, timestamp)
        if answered is None or tfo_secret is None:
            assert options.fastopen is None
        else:
            primary = derive_tfo_key(secret, 19_801)
            assert options.fastopen == FastOpen(fastopen_cookie(primary, client_address, server_address), answered)


@pytest.mark.parametrize("family", [4, 6])
def test_a_cookie_the_front_hands_out_opens_a_tfo_connection_on_a_backend(pair, family):
    """The whole way with real kernels: a Linux client's cookie request answered by the front's handler
    (the server namespace's kernel kept out of it), then that client's TFO SYN to a backend whose keys
    the backend loader installed: its data is accepted in the SYN."""
    client, server = pair
    secret, now = os.urandom(32), time.time()
    policy = front_policy(family, secret)
    forget_cookies(client)
    drop_syns = ["INPUT", "-p", "tcp", "--dport", str(SERVER_PORT), "-j", "DROP"]
    iptables = "iptables" if family == 4 else "ip6tables"
    netns.run(server, [iptables, "-w", "-I", *drop_syns])
    try:
        with netns.inside(server):
            sender = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW,
                                   socket.IPPROTO_RAW)
        with sender, capture(server) as captured:
            with netns.inside(client):
                connection = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                connection.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    connection.connect((ADDRESSES[family][1], SERVER_PORT))
                verdict = handle(next_syn(captured, family), now, SaltSchedule((b"f" * 32,)), policy)
                sender.sendto(verdict.packet, (ADDRESSES[family][0], 0))
                connection.setblocking(True)
                connection.settimeout(TIMEOUT)
                connection.getpeername()  # the handshake completed against the front's SYN-ACK
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        netns.run(server, [iptables, "-w", "-D", *drop_syns])
    with netns.inside(server):
        install_fastopen_keys(secret, policy.tfo_key_period, now)
    with listener(server, family) as listening:
        _, moved = exchange(pair, family, b"data in the SYN", listening)
    assert moved["Passive"] == 1 and moved["PassiveFail"] == 0


def next_syn(capture_socket: socket.socket, family: int) -> bytes:
    """The first SYN to the server port the capture sees."""
    for data, segment in captured_segments(capture_socket, family):
        if segment.dport == SERVER_PORT and segment.flags & (SYN | ACK) == SYN:
            return data
    raise AssertionError(f"no SYN within {TIMEOUT} s")


def tfo_syn(family: int, cookie: bytes, data: bytes = b"GET / HTTP/1.0\r\n\r\n", source: str | None = None,
            experimental: bool = False) -> bytes:
    client, server = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])
    if source is not None:
        client = ipaddress.ip_address(source).packed
    return build_tcp_packet(client, server, 40000, SERVER_PORT, 1000, 0, SYN, 64240,
                            build_tcp_options(1460, 7, True, (5, 0), FastOpen(cookie, experimental)), data)


def farm_cookie(secret: bytes, key_period: int, family: int, source: str | None = None) -> bytes:
    client, server = (ipaddress.ip_address(a).packed for a in ADDRESSES[family])
    if source is not None:
        client = ipaddress.ip_address(source).packed
    return fastopen_cookie(derive_tfo_key(secret, key_period), client, server)


TFO_SECRET, TFO_NOW = bytes(range(32)), 19_801 * 86400.0 + 7  # key period 19801


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("key_period", [19_801, 19_800], ids=["primary", "backup"])
@pytest.mark.parametrize("experimental", [False, True])
def test_a_syn_with_a_valid_tfo_cookie_goes_to_its_backend_flagged_fastopen(family, key_period, experimental):
    """Encapsulated as any packet of the flow (same backend, former owners, MAC), flagged FASTOPEN
    under the MAC; the SYN itself, data and options, unchanged inside."""
    policy = front_policy(family, TFO_SECRET)
    syn = tfo_syn(family, farm_cookie(TFO_SECRET, key_period, family), experimental=experimental)
    verdict = handle(syn, TFO_NOW, SaltSchedule((b"f" * 32,)), policy, FastOpenLimit())
    assert (verdict.action, verdict.outcome, verdict.fastopen, verdict.backend) == (
        Action.FORWARD, "fastopen_accepted", "accepted", 0)
    segment = parse_tcp(syn)
    flow = flow_hash(segment.saddr, segment.daddr, segment.sport, segment.dport, policy.flow_key)
    assert verdict.packet == encap.encapsulate(syn, segment, policy.farm_address, policy.backends[0],
                                               policy.encap_port, flow, False, policy.encap_key, fastopen=True)
    assert verdict.packet[29] == encap.FLAG_FASTOPEN and verdict.packet[encap.OVERHEAD:] == syn
    # Forwarded unflagged (as a failed cookie would be), the MAC no longer holds: the flag is under it.
    assert verdict.packet[40:48] != encap.encapsulate(syn, segment, policy.farm_address, policy.backends[0],
                                                      policy.encap_port, flow, False, policy.encap_key)[40:48]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case, fallback", [
    ("expired", "invalid_cookie"),      # two key periods old: Linux refuses it too
    ("other client", "invalid_cookie"),  # made for another address
    ("forged", "invalid_cookie"),
    ("no data", "no_data"),
    ("too big", "too_big"),
    ("disabled", "disabled"),
    ("no limiter", "rate_limited"),
])
def test_a_tfo_syn_in_doubt_gets_the_stateless_cookie_syn_ack(family, case, fallback):
    """With a fresh TFO cookie (the primary's) when TFO is on, as Linux answers a cookie it refuses:
    the client completes the handshake and sends its data again."""
    cookie = {"expired": farm_cookie(TFO_SECRET, 19_799, family),
              "other client": farm_cookie(TFO_SECRET, 19_801, family, "10.9.9.9" if family == 4 else "2001:db8::99"),
              "forged": bytes(8)}.get(case, farm_cookie(TFO_SECRET, 19_801, family))
    data = {"no data": b"", "too big": bytes(1500)}.get(case, b"GET / HTTP/1.0\r\n\r\n")
    policy = front_policy(family, None if case == "disabled" else TFO_SECRET)
    verdict = handle(tfo_syn(family, cookie, data), TFO_NOW, SaltSchedule((b"f" * 32,)), policy,
                     None if case == "no limiter" else FastOpenLimit())
    assert (verdict.action, verdict.outcome, verdict.fastopen) == (Action.REPLY, "syn_answered", fallback)
    reply = parse_tcp(verdict.packet)
    assert reply.flags == SYN | ACK and reply.ack == 1001  # the data is not acknowledged
    fresh = None if case == "disabled" else FastOpen(farm_cookie(TFO_SECRET, 19_801, family), False)
    assert parse_tcp_options(reply.raw_options).fastopen == fresh
    assert (fallback in FASTOPEN_COOKIE_ISSUED) == (fresh is not None)


def test_one_source_beyond_its_tfo_budget_falls_back_and_others_do_not():
    """A burst of FASTOPEN_PER_SOURCE_BURST, then FASTOPEN_PER_SOURCE_RATE a second; other addresses
    keep their own budget."""
    policy, limit, schedule = front_policy(4, TFO_SECRET), FastOpenLimit(), SaltSchedule((b"f" * 32,))
    flooder, other = "10.0.0.7", "10.0.0.8"

    def results(source: str, count: int, now: float) -> list[str]:
        syn = tfo_syn(4, farm_cookie(TFO_SECRET, 19_801, 4, source), source=source)
        return [handle(syn, now, schedule, policy, limit).fastopen for _ in range(count)]

    assert results(flooder, 100, TFO_NOW) == ["accepted"] * FASTOPEN_PER_SOURCE_BURST + ["rate_limited"] * (
        100 - FASTOPEN_PER_SOURCE_BURST)
    assert results(other, 5, TFO_NOW) == ["accepted"] * 5
    assert results(flooder, 100, TFO_NOW + 1) == ["accepted"] * FASTOPEN_PER_SOURCE_RATE + ["rate_limited"] * (
        100 - FASTOPEN_PER_SOURCE_RATE)


def test_the_per_source_tfo_budget_remembers_a_bounded_number_of_sources():
    limit = FastOpenLimit(rate=1, burst=1, sources=3)
    assert all(limit.take(bytes([i]), 0.0) for i in range(3))
    assert not limit.take(bytes([0]), 0.0)  # still remembered, and spent
    assert limit.take(bytes([3]), 0.0)     # a fourth: the least recently seen (1) is forgotten
    assert len(limit.buckets) == 3 and bytes([1]) not in limit.buckets
    assert limit.take(bytes([1]), 0.0)     # back with a full bucket (the bound FASTOPEN_SOURCES explains)


def test_a_fastopen_syn_is_never_passed_along_the_chain():
    """A backend that does not hold the flow never passes a FASTOPEN SYN on to a former owner: the SYN
    makes its connection where the front sent it, as a VALIDATED ACK does."""
    previous, earlier = bytes([198, 18, 20, 3]), bytes([198, 18, 20, 4])
    assert encap.next_owner(encap.FLAG_FASTOPEN, bytes([198, 18, 20, 2]), previous + earlier) is None
    assert encap.next_owner(0, bytes([198, 18, 20, 2]), previous + earlier) == previous
