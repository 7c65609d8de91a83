"""Real Linux TCP stacks through the default front (XDP), compared with the same client talking straight to
the backend: option mixes, handshake edge cases, and hostile packets at the running front.

Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q tests/test_lab_wire.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
from pathlib import Path

import pytest

from synproxy import encap
from synproxy.cookie import MSS_TABLE, mss_index
from synproxy.lab.topology import TCP_INFO_PORT, VIP, VIP6, Lab, default_hosts
from synproxy.netns import inside, read_sysctl
from synproxy.packet import ACK, SYN, build_tcp_packet
from synproxy.tcpinfo import negotiated
from tests import hostile
from tests.lab_fixtures import backend_stats, clients, data_plane, needs_root, outcomes, running_lab
from tests.test_lab_robustness import icmp_too_big_received, reload_fronts

pytestmark = [pytest.mark.netns, needs_root]
TARGETS = {4: (VIP, "198.18.20.2"), 6: (VIP6, "2001:db8:20::2")}  # (through the fronts, straight to backend0)
TRANSFER = 1 << 20  # each way: many windows at the client's initial window


@pytest.fixture(scope="module")
def lab():
    with running_lab("spw", hosts=default_hosts(fronts=2, backends=1)) as lab:
        assert data_plane(lab) == "xdp"
        yield lab


@contextlib.contextmanager
def sysctls(lab: Lab, host: str, settings: dict[str, str]):
    """The host's sysctls set for the body, then back to what they were."""
    before = {key: read_sysctl(lab.ns(host), key) for key in settings}
    lab.sysctl(host, settings)
    try:
        yield
    finally:
        lab.sysctl(host, before)


def transfer(lab: Lab, target: str, size: int = TRANSFER, rcvbuf: int | None = None) -> tuple[dict, dict]:
    """Upload and download ``size`` bytes on one connection from the client to the TCP_INFO server; what
    TCP negotiated as the client and as the server see it."""
    with inside(lab.ns("client")):
        sock = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET)
    with sock:
        sock.settimeout(10)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((target, TCP_INFO_PORT))
        sock.sendall(f"POST / HTTP/1.0\r\nContent-Length: {size}\r\nX-Download: {size}\r\n\r\n".encode()
                     + bytes(size))
        answer = bytearray()
        while chunk := sock.recv(1 << 16):
            answer += chunk
        client = negotiated(sock)
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    line, _, download = body.partition(b"\n")
    server = json.loads(line)
    assert head.startswith(b"HTTP/1.0 200"), head[:40]
    assert (server["received"], len(download)) == (size, size)
    return client, server["tcp_info"]


def direct_and_proxied(lab: Lab, family: int, around=contextlib.nullcontext, **kwargs) -> dict:
    """The same transfer straight to backend0 and through the fronts, each inside a fresh ``around()``:
    {(path, end): tcp_info}."""
    vip, backend = TARGETS[family]
    seen = {}
    for path, target in (("direct", backend), ("proxied", vip)):
        with around():
            seen[path, "client"], seen[path, "server"] = transfer(lab, target, **kwargs)
    return seen


def assert_as_direct(seen: dict, family: int, client_mss: int | None = None,
                     options=("timestamps", "sack", "wscale", "ecn")) -> None:
    """What the front changes is its MSS (the encapsulation's room) and the server's window scale (the
    configured server_wscale, which the backend's own may differ from): everything else as a direct
    connection negotiates it. ``client_mss``: the MSS the client's SYN announces, when not its link's."""
    for end in ("client", "server"):
        direct, proxied = seen["direct", end], seen["proxied", end]
        for option in options:
            assert proxied[option] == direct[option], (end, option, seen)
    for option in ("timestamps", "sack", "wscale", "ecn"):
        assert seen["proxied", "client"][option] == seen["proxied", "server"][option], (option, seen)
    direct, proxied = seen["direct", "server"], seen["proxied", "server"]
    assert proxied["snd_wscale"] == direct["snd_wscale"], seen  # the client's scale reached the backend
    if proxied["wscale"]:
        assert proxied["rcv_wscale"] == seen["proxied", "client"]["snd_wscale"] == 7
        assert seen["proxied", "client"]["rcv_wscale"] == proxied["snd_wscale"]
    option_bytes = 12 if proxied["timestamps"] else 0
    announced = 1460 - encap.OVERHEAD - (20 if family == 6 else 0)
    assert seen["proxied", "client"]["snd_mss"] == min(seen["direct", "client"]["snd_mss"], announced - option_bytes)
    # The backend sends what the cookie carried: the client's MSS rounded down to the family's table (as
    # Linux's own cookies do: an IPv4 client announcing 1220 gets 536-byte segments).
    carried = MSS_TABLE[family][mss_index(family, client_mss or (1460 if family == 4 else 1440))]
    assert proxied["snd_mss"] == min(direct["snd_mss"], carried - option_bytes), seen


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("settings", [
    {},
    {"net.ipv4.tcp_ecn": "1"},
    {"net.ipv4.tcp_ecn": "0", "net.ipv4.tcp_sack": "0"},
    {"net.ipv4.tcp_timestamps": "0", "net.ipv4.tcp_window_scaling": "0"},
    {"net.ipv4.tcp_rmem": "4096\t131072\t1073741824"},  # the largest scale, 14
], ids=["defaults", "ecn", "no-ecn-no-sack", "no-ts-no-wscale", "wscale14"])
def test_a_client_negotiates_through_the_front_what_it_would_directly(lab, family, settings):
    with sysctls(lab, "client", settings):
        seen = direct_and_proxied(lab, family)
    assert_as_direct(seen, family)
    if "tcp_rmem" in settings:
        assert seen["proxied", "server"]["snd_wscale"] == 14


@pytest.mark.parametrize("family", [4, 6])
def test_a_tiny_receive_buffer_gets_window_scale_zero_and_still_moves_data(lab, family):
    seen = direct_and_proxied(lab, family, size=1 << 16, rcvbuf=2048)
    assert_as_direct(seen, family)
    assert seen["proxied", "server"]["snd_wscale"] == 0


def client_route(lab: Lab, family: int, *attributes: str) -> None:
    """The client's default route of ``family``, with route attributes (advmss, mtu) or without."""
    gateway = "198.18.1.1" if family == 4 else "2001:db8:1::1"
    lab.run("client", ["ip", f"-{family}", "route", "replace", "default", "via", gateway, *attributes])


@contextlib.contextmanager
def mtu(lab: Lab, size: int):
    """The client's link to the router (both ends) at ``size``."""
    for host, device in (("client", "eth0"), ("router", "client")):
        lab.run(host, ["ip", "link", "set", device, "mtu", str(size)])
    try:
        yield
    finally:
        for host, device in (("client", "eth0"), ("router", "client")):
            lab.run(host, ["ip", "link", "set", device, "mtu", "1500"])
        for family in (4, 6):
            client_route(lab, family)


@pytest.mark.parametrize("family, attributes", [
    (4, ("advmss", "536")), (4, ("advmss", "1220")), (6, ("advmss", "1220")), (6, ("mtu", "1280")),
    (4, ("advmss", "8960")), (6, ("advmss", "8940"))])
def test_the_client_mss_reaches_the_backend_as_the_cookie_table_has_it(lab, family, attributes):
    with mtu(lab, 9000 if int(attributes[1]) > 1500 else 1500):
        client_route(lab, family, *attributes)
        seen = direct_and_proxied(lab, family, size=1 << 18)
    announced = int(attributes[1]) - (0 if attributes[0] == "advmss" else 60)
    assert_as_direct(seen, family, announced)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("option", ["tcp_sack", "tcp_timestamps", "tcp_window_scaling"])
def test_an_option_the_backend_has_off_resets_the_client_at_once_and_is_counted(lab, family, option):
    """The kfunc refuses an option the backend's sysctl disables (NOTES.md), and the front cannot know
    the backend's sysctls: the client that asked for it gets a RST to its handshake ACK, not a hang
    (docs/backend.md, "Options the backend has off"). Direct, the same client connects without it."""
    before = backend_stats(lab, "backend0")["kfunc_errors"].get("EINVAL", 0)
    with sysctls(lab, "backend0", {f"net.ipv4.{option}": "0"}):
        vip, backend = TARGETS[family]
        client, _ = transfer(lab, backend, size=1 << 16)
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            transfer(lab, vip, size=1 << 16)
    assert time.monotonic() - started < 1
    assert not client[{"tcp_sack": "sack", "tcp_timestamps": "timestamps", "tcp_window_scaling": "wscale"}[option]]
    assert backend_stats(lab, "backend0")["kfunc_errors"]["EINVAL"] > before


@pytest.mark.parametrize("keys", [("sack", "ecn"), ("timestamps", "window_scaling")], ids="-".join)
def test_a_farm_configured_without_options_serves_backends_that_have_them_off(lab, keys):
    """With `sack: false` and `ecn: false` (or `timestamps: false` and `window_scaling: false`) the fronts
    offer neither, so a backend whose matching sysctls are 0 serves clients that ask for both, and both
    ends agree, as directly. With the defaults the kernel resets these clients (SACK, timestamps, window
    scaling) or runs them without ECN while the client's end uses it."""
    original = lab.config_path.read_text()
    with sysctls(lab, "client", {"net.ipv4.tcp_ecn": "1"}), \
            sysctls(lab, "backend0", {f"net.ipv4.tcp_{key}": "0" for key in keys}):
        lab.config_path.write_text(original + "".join(f"{key}: false\n" for key in keys))
        try:
            reload_fronts(lab)
            for family in (4, 6):
                seen = direct_and_proxied(lab, family, size=1 << 18)
                assert_as_direct(seen, family)
                for key in keys:  # tcpinfo.negotiated's names
                    assert not seen["proxied", "client"]["wscale" if key == "window_scaling" else key], key
        finally:
            lab.config_path.write_text(original)
            reload_fronts(lab)


@contextlib.contextmanager
def client_rule(lab: Lab, family: int, chain: str, *match: str, host: str = "client"):
    """One iptables rule dropping what it matches in the client's namespace (or ``host``'s), removed
    afterwards; yields a function that says how many packets it dropped so far."""
    tool = "iptables" if family == 4 else "ip6tables"
    rule = [chain, "-p", "tcp", *match, "-m", "comment", "--comment", "wire-test", "-j", "DROP"]
    lab.run(host, [tool, "-w", "-A", *rule])

    def dropped() -> int:
        listing = lab.run(host, [tool, "-w", "-L", chain, "-v", "-x", "-n"]).stdout.splitlines()
        return sum(int(line.split()[0]) for line in listing if "wire-test" in line)
    try:
        yield dropped
    finally:
        lab.run(host, [tool, "-w", "-D", *rule])


def first_only() -> tuple[str, ...]:
    """Matches the first packet the rule sees, and never again (while the rule lives)."""
    return ("-m", "statistic", "--mode", "nth", "--every", "1000000000", "--packet", "0")


def netstat(lab: Lab, host: str) -> dict[str, int]:
    """The host's TcpExt counters (/proc/net/netstat follows the reader's namespace)."""
    with inside(lab.ns(host)):
        lines = Path("/proc/net/netstat").read_text().splitlines()
    names, values = (line.split()[1:] for line in lines if line.startswith("TcpExt:"))
    return dict(zip(names, map(int, values)))


@pytest.mark.parametrize("family", [4, 6])
def test_a_lost_handshake_ack_is_made_good_by_the_first_data_segment(lab, family):
    """The front first sees the client's data (with the same ACK): it validates the cookie and the backend
    creates the connection from it, data included."""
    created, drops = backend_stats(lab, "backend0")["created"], []

    @contextlib.contextmanager
    def handshake_ack_lost():
        with client_rule(lab, family, "OUTPUT", "--dport", str(TCP_INFO_PORT), "--tcp-flags", "ALL", "ACK",
                         "-m", "length", "--length", "0:100", *first_only()) as dropped:
            yield
            drops.append(dropped())

    seen = direct_and_proxied(lab, family, handshake_ack_lost, size=1 << 16)
    assert drops == [1, 1]
    assert_as_direct(seen, family)
    assert backend_stats(lab, "backend0")["created"] == created + 1


@pytest.mark.parametrize("family", [4, 6])
def test_a_syn_retransmitted_after_a_lost_syn_ack_negotiates_as_directly(lab, family):
    """The front answers the retransmitted SYN anew. Linux sends it without ECE|CWR (tcp_ecn_clear_syn,
    RFC 3168 6.1.1), so ECN is off on both ends; directly, the backend's request socket resends its first
    SYN-ACK (with ECE) and ECN is on. A stateless front has no SYN-ACK to resend (docs/front.md, "Real
    clients")."""
    drops = []

    @contextlib.contextmanager
    def syn_ack_lost():
        with client_rule(lab, family, "INPUT", "--sport", str(TCP_INFO_PORT), "--tcp-flags", "SYN,ACK", "SYN,ACK",
                         *first_only()) as dropped:
            yield
            drops.append(dropped())

    with sysctls(lab, "client", {"net.ipv4.tcp_ecn": "1"}):
        seen = direct_and_proxied(lab, family, syn_ack_lost, size=1 << 16)
    assert drops == [1, 1]
    assert_as_direct(seen, family, options=("timestamps", "sack", "wscale"))
    assert seen["direct", "server"]["ecn"] and not seen["proxied", "server"]["ecn"]


def resets_dropped(lab: Lab) -> int:
    """backend0's segments of no connection dropped (a RST is never answered), by its XDP stage or its tc
    program."""
    stats = backend_stats(lab, "backend0")
    return stats["no_flow_dropped"] + stats.get("xdp", {}).get("no_flow_dropped", 0)


@pytest.mark.parametrize("family", [4, 6])
def test_a_client_that_resets_the_syn_ack_leaves_no_connection_on_the_backend(lab, family):
    """SYNs from ports no socket holds (a client that gave up before the SYN-ACK): the client's kernel
    answers each SYN-ACK with a RST, which the front forwards and the backend drops (no connection owns
    it); nothing is created. Before, the test dropped every SYN-ACK in the client's INPUT, so no RST was
    ever sent and nothing reached the backend: it passed whatever the backend did."""
    vip, _ = TARGETS[family]
    source, destination = (hostile.CLIENT4, hostile.VIP4) if family == 4 else (hostile.CLIENT6, hostile.VIP6)
    created, dropped = backend_stats(lab, "backend0")["created"], resets_dropped(lab)
    with inside(lab.ns("client")):
        sender = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_RAW,
                               socket.IPPROTO_RAW)
    with sender:
        for sport in range(43000, 43010):
            sender.sendto(build_tcp_packet(source, destination, sport, TCP_INFO_PORT, 1, 0, SYN, 64240), (vip, 0))
    deadline = time.monotonic() + 5
    while resets_dropped(lab) - dropped < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resets_dropped(lab) - dropped >= 10
    assert backend_stats(lab, "backend0")["created"] == created
    transfer(lab, vip, size=1 << 12)


@pytest.mark.parametrize("family", [4, 6])
def test_half_close_delivers_everything_both_ways(lab, family):
    vip, _ = TARGETS[family]
    payload = bytes(range(256)) * 2048
    with inside(lab.ns("client")):
        sock = socket.create_connection((vip, 7), timeout=10)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the echo server still answers all of it, then closes
        echoed = bytearray()
        while chunk := sock.recv(1 << 16):
            echoed += chunk
    assert echoed == payload


@contextlib.contextmanager
def segments_unmerged(lab: Lab):
    """The senders without segmentation offload: the router then drops single segments, not 64 KB batches."""
    senders = ("client", "backend0")
    for host in senders:
        lab.run(host, ["ethtool", "-K", "eth0", "gso", "off", "tso", "off"])
    try:
        yield
    finally:
        for host in senders:
            lab.run(host, ["ethtool", "-K", "eth0", "gso", "on", "tso", "on"], check=False)


def recoveries(lab: Lab) -> dict[str, int]:
    return {host: netstat(lab, host)["TCPSackRecovery"] for host in ("client", "backend0")}


@pytest.mark.parametrize("family", [4, 6])
def test_sack_recovery_under_two_percent_loss_both_ways(lab, family):
    """Both senders (the client uploading, the backend answering) recover with SACK from random loss on the
    router (a drop in the client's own OUTPUT is a local error its TCP retries, not a loss)."""
    vip, _ = TARGETS[family]
    before = recoveries(lab)
    loss = ("-m", "statistic", "--mode", "random", "--probability", "0.02")
    with segments_unmerged(lab), \
            client_rule(lab, family, "FORWARD", "-o", "client", "--sport", str(TCP_INFO_PORT), *loss, host="router"), \
            client_rule(lab, family, "FORWARD", "-i", "client", "--dport", str(TCP_INFO_PORT), *loss, host="router"):
        client, server = transfer(lab, vip, size=1 << 21)
    assert client["sack"] and server["sack"]
    after = recoveries(lab)
    assert all(after[host] > before[host] for host in after), (before, after)


def fragments(packet: bytes) -> list[bytes]:
    """An IPv4 SYN split in two fragments (as a router without DF would), checksums left to the kernel."""
    header, body = bytearray(packet[:20]), packet[20:]
    first, second = bytearray(header), bytearray(header)
    first[6:8] = (0x2000).to_bytes(2, "big")  # MF, offset 0
    second[6:8] = (16 // 8).to_bytes(2, "big")  # offset 16 bytes
    return [bytes(first) + body[:16], bytes(second) + body[16:]]


def with_destination_options(packet: bytes) -> bytes:
    """An IPv6 packet with an 8-byte Destination Options header (PadN) before its TCP segment."""
    header = bytearray(packet[:40])
    header[4:6] = (int.from_bytes(header[4:6], "big") + 8).to_bytes(2, "big")
    header[6] = 60
    return bytes(header) + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + packet[40:]


def hostile_wave(lab: Lab) -> tuple[int, int]:
    """Every hostile.py kind, a full-MTU SYN with data, fragments and IPv6 extension headers, from the
    attacker at the VIPs; (sent, refused by the attacker's own kernel)."""
    rng = random.Random(3)
    wave = [packet for _, packet in hostile.packets(17 * 20)]
    for family, (source, vip) in ((4, (hostile.CLIENT4, hostile.VIP4)), (6, (hostile.CLIENT6, hostile.VIP6))):
        size = 1500 - (40 if family == 4 else 60)
        syn = build_tcp_packet(source, vip, rng.randrange(1024, 65536), TCP_INFO_PORT, rng.getrandbits(32), 0, SYN,
                               64240, payload=bytes(size))
        wave.append(syn)
        wave += fragments(syn[:80]) if family == 4 else [with_destination_options(syn[:100])]
    with inside(lab.ns("attacker")):
        senders = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                   6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)}
    refused = 0
    with senders[4], senders[6]:
        for packet in wave:
            family = 6 if packet and packet[0] >> 4 == 6 else 4
            try:
                senders[family].sendto(packet, (VIP if family == 4 else VIP6, 0))
            except OSError:
                refused += 1
    return len(wave), refused


def test_hostile_packets_at_the_running_front_are_counted_and_stop_nobody(lab):
    counted_before = sum(outcomes(lab).values())
    for _ in range(3):
        sent, refused = hostile_wave(lab)
        for family in (4, 6):
            transfer(lab, TARGETS[family][0], size=1 << 12)  # legitimate clients between the waves
    time.sleep(0.5)
    counted = sum(outcomes(lab).values()) - counted_before
    print(json.dumps({"sent": 3 * sent, "refused": 3 * refused, "counted": counted}))
    assert all(os.waitpid(lab.pid(host.name), os.WNOHANG) == (0, 0) for host in lab.by_role("front"))
    assert counted >= 3 * (sent - refused) // 2
    for family in (4, 6):
        assert clients(lab, 10, "--target", TARGETS[family][0])["failed"] == 0


def test_a_front_on_a_jumbo_link_falls_back_to_tc_and_answers_jumbo_frames(lab):
    """Last in this module: front0 ends on a 9000-MTU link. A veth (like many NIC drivers) refuses
    native XDP above a page-sized MTU, so `auto` takes the tc program, and says why. Jumbo frames (9000
    bytes, DF) at the VIP: data too big to encapsulate gets ICMP "fragmentation needed" although the
    queue's copy of it is cut at ~4 KB (netfilterqueue's copy range); a SYN with 8 KB of data, whose
    checksum the program does not sum that far, is dropped by the queue as malformed (no client sends
    one: a TFO SYN's data fits the MSS the front announced). No node stops.
    """
    lab.stop_process("front0")
    lab.run("router", ["ip", "link", "set", "front0", "xdpdrv", "off"])
    for host, device in (("router", "front0"), ("front0", "eth0"), ("router", "client"), ("client", "eth0")):
        lab.run(host, ["ip", "link", "set", device, "mtu", "9000"])
    lab.start_front("front0")
    assert lab.data_plane_of(lab.by_role("front")[0])["mode"] == "tc"
    log = (lab.state_dir / "logs" / "front0.log").read_text()
    assert '"reason": "auto: tc loaded and attached; xdp: attaching XDP to eth0 failed' in log
    before = outcomes(lab)
    with inside(lab.ns("client")):
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    with sender, receiver:
        for sport in range(42000, 42000 + 40):  # the router's L4 hash sends some to each front
            for flags, ack in ((SYN, 0), (ACK, 1)):
                sender.sendto(build_tcp_packet(hostile.CLIENT4, hostile.VIP4, sport, TCP_INFO_PORT, 1, ack, flags,
                                               64240, payload=bytes(9000 - 40)), (VIP, 0))
        mtus = icmp_too_big_received(4, {4: receiver}, 1.0)
    moved = outcomes(lab) - before
    assert moved["tc", "unverified", "ipv4"] > 0 and moved["tc", "too_big", "ipv4"] > 0, moved
    assert moved["queue", "malformed_bad_ip_length", "ipv4"] == moved["tc", "unverified", "ipv4"], moved
    assert moved["queue", "too_big", "ipv4"] == moved["tc", "too_big", "ipv4"], moved
    assert mtus.count(1500 - encap.OVERHEAD) == moved["tc", "too_big", "ipv4"], mtus
    assert all(os.waitpid(lab.pid(host.name), os.WNOHANG) == (0, 0) for host in lab.by_role("front"))
    for family in (4, 6):
        assert_as_direct(direct_and_proxied(lab, family, size=1 << 18), family)

