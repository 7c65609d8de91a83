"""The loader's side of 4-tuple reuse (synproxy/backend/timewait.py) on real sockets in a namespace of the
test's own: only a TIME_WAIT or request socket of the reported tuple is destroyed; and the frame that
re-injects a dropped segment."""

from __future__ import annotations

import errno
import ipaddress
import socket
import time

import pytest

from synproxy import netns
from synproxy.backend.timewait import NETLINK_SOCK_DIAG, TimeWaitEvent, destroy_recycled, reinjection_frame
from synproxy.packet import ACK, PROTO_TCP, PSH, build_tcp_packet, internet_checksum, tcp_checksum_completed
from tests.lab_fixtures import needs_root

pytestmark = needs_root
VIP, CLIENT, PORT, CLIENT_PORT = "198.19.0.10", "198.18.1.2", 80, 41001


def event_for(client_port: int = CLIENT_PORT, seq: int = 1000, ack: int = 5000) -> TimeWaitEvent:
    return TimeWaitEvent(4, ipaddress.ip_address(CLIENT).packed, ipaddress.ip_address(VIP).packed,
                         client_port.to_bytes(2, "big"), PORT.to_bytes(2, "big"), seq, ack)


def states(name: str) -> str:
    return netns.run(name, ["ss", "-Htan", f"( sport = :{PORT} and dport = :{CLIENT_PORT} )"]).stdout


@pytest.fixture
def namespace():
    name = netns.unique_name("sptd")
    with netns.namespaces(name), netns.inside(name):
        netns.run(name, ["ip", "link", "set", "lo", "up"])
        netns.add_addresses(name, "lo", f"{VIP}/32", f"{CLIENT}/32")
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as diag, \
                socket.create_server((VIP, PORT)) as listener:
            yield name, diag, listener


def test_only_the_time_wait_socket_of_the_tuple_is_destroyed(namespace):
    name, diag, listener = namespace
    client = socket.create_connection((VIP, PORT), source_address=(CLIENT, CLIENT_PORT))
    server, _ = listener.accept()
    assert not destroy_recycled(diag, event_for()), "an established connection is not touched"
    assert "ESTAB" in states(name)
    server.close()
    client.close()
    time.sleep(0.05)
    assert "TIME-WAIT" in states(name)
    assert not destroy_recycled(diag, event_for(CLIENT_PORT + 1))  # another tuple: nothing there
    assert destroy_recycled(diag, event_for())
    assert states(name) == ""
    assert not destroy_recycled(diag, event_for()), "reported twice: the second finds nothing"


def test_a_request_socket_of_the_tuple_is_destroyed(namespace):
    """The stale request socket a validated ACK met (the program's RST to it lost): the client's ACK of the
    SYN-ACK dropped, the server's side stays SYN-RECV."""
    name, diag, _ = namespace
    netns.run(name, ["iptables", "-A", "OUTPUT", "-p", "tcp", "--sport", str(CLIENT_PORT), "-j", "DROP", "!",
                     "--tcp-flags", "SYN", "SYN"])
    with socket.socket() as client:
        client.bind((CLIENT, CLIENT_PORT))
        client.setblocking(False)
        assert client.connect_ex((VIP, PORT)) == errno.EINPROGRESS
        time.sleep(0.05)
        assert states(name).split()[0] == "SYN-RECV"
        assert destroy_recycled(diag, event_for())
        assert "SYN-RECV" not in states(name)


@pytest.mark.parametrize("client, vip", [(CLIENT, VIP), ("2001:db8:1::2", "2001:db8::10")])
def test_a_partial_checksum_is_completed_and_a_wrong_one_refused(client, vip):
    """A segment whose sender offloaded its checksum carries only the pseudo-header's sum: re-injected
    through a packet socket it would be checked in full and dropped, so it is completed; any other wrong
    checksum is a damaged segment, never made valid."""
    whole = build_tcp_packet(ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed, CLIENT_PORT, PORT,
                             1000, 5000, ACK | PSH, 0, payload=b"GET / HTTP/1.0\r\n\r\n")
    start = 20 if ":" not in client else 40
    addresses = whole[12:20] if ":" not in client else whole[8:40]
    pseudo_header_sum = ~internet_checksum(addresses + bytes([0, PROTO_TCP]) + (len(whole) - start).to_bytes(2, "big"))
    partial = whole[:start + 16] + (pseudo_header_sum & 0xFFFF).to_bytes(2, "big") + whole[start + 18:]
    damaged = whole[:start + 16] + bytes(2) + whole[start + 18:]
    assert tcp_checksum_completed(whole) == whole
    assert tcp_checksum_completed(partial) == whole
    assert tcp_checksum_completed(damaged) is None


def test_only_what_was_not_yet_re_injected_and_was_copied_whole_is_re_injected():
    packet = build_tcp_packet(ipaddress.ip_address(CLIENT).packed, ipaddress.ip_address(VIP).packed, CLIENT_PORT,
                              PORT, 1000, 5000, ACK, 0)
    event = event_for()._replace(front=bytes([10, 0, 0, 1]), backend=bytes([10, 0, 0, 2]), source_port=b"\xc0\x01",
                                 encap_port=(6080).to_bytes(2, "big"), header=bytes(20), packet=packet)
    frame = reinjection_frame(event)
    assert frame[:14] == bytes(12) + b"\x08\x00" and frame[-len(packet):] == packet
    assert frame[14 + 20:14 + 28] == b"\xc0\x01\x17\xc0" + (8 + 20 + len(packet)).to_bytes(2, "big") + bytes(2)
    assert reinjection_frame(event._replace(reinjected=True)) is None
    assert reinjection_frame(event._replace(packet=b"")) is None
