"""The loader's side of 4-tuple reuse (synproxy/backend/timewait.py) on real sockets in a namespace of the
test's own: only a TIME_WAIT socket of the reported tuple is destroyed, and the probe makes a client's
TCP repeat its ACK."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest
from scapy.layers.inet import IP, TCP

from synproxy import netns
from synproxy.backend.timewait import NETLINK_SOCK_DIAG, TimeWaitEvent, destroy_time_wait, elicit_ack
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
    assert not destroy_time_wait(diag, event_for()), "an established connection is not touched"
    assert "ESTAB" in states(name)
    server.close()
    client.close()
    time.sleep(0.05)
    assert "TIME-WAIT" in states(name)
    assert not destroy_time_wait(diag, event_for(CLIENT_PORT + 1))  # another tuple: nothing there
    assert destroy_time_wait(diag, event_for())
    assert states(name) == ""
    assert not destroy_time_wait(diag, event_for()), "reported twice: the second finds nothing"


def test_the_probe_makes_the_client_repeat_its_ack(namespace):
    """A client's connection to the VIP (the server side stands in for what the fronts made): the probe,
    one below the client's next expected sequence number, gets the client's ACK with the numbers its
    handshake ACK carried."""
    _, _, listener = namespace
    with socket.create_connection((VIP, PORT), source_address=(CLIENT, CLIENT_PORT)) as client, \
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as capture, \
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw_socket:
        server, _ = listener.accept()
        capture.settimeout(2)
        # What the client expects next and what the server has acknowledged, read from a server segment.
        server.sendall(b"x")
        client.recv(1)
        while True:
            segment = IP(capture.recv(2048))
            if segment[TCP].sport == PORT and segment[TCP].dport == CLIENT_PORT:
                expected_by_client = segment[TCP].seq + 1
                acked_by_server = segment[TCP].ack
                break
        time.sleep(0.3)  # the client's (delayed) ACK of that byte carries the same numbers: let it pass
        capture.setblocking(False)
        while True:
            try:
                capture.recv(2048)
            except BlockingIOError:
                break
        capture.settimeout(2)
        raw_socket.sendto(elicit_ack(event_for(seq=acked_by_server, ack=expected_by_client)), (CLIENT, 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            segment = IP(capture.recv(2048))
            tcp = segment[TCP]
            if tcp.sport == CLIENT_PORT and tcp.dport == PORT and not len(tcp.payload):
                assert (tcp.seq, tcp.ack, tcp.flags) == (acked_by_server, expected_by_client, "A")
                break
        else:
            pytest.fail("the client did not answer the probe")
        server.close()
