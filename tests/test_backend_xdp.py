"""The backend's XDP stage (bpf/backend_xdp.bpf.c) under BPF_PROG_TEST_RUN, loaded over the tc program's maps
as the loader loads it: what it strips is, byte for byte, what the tc program would have delivered, and
everything else reaches the tc program untouched."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from synproxy import encap, netns
from synproxy.backend.loader import XDP_COUNTERS, XdpStage, read_xdp_counters, xdp_stage
from synproxy.bpf.libbpf import (
    XDP_FLAGS_DRV_MODE,
    BpfObject,
    prog_test_run,
    program_id,
    xdp_attach,
    xdp_attached_program,
)
from synproxy.bpf.loading import build_object, interface_index
from tests.conftest import on_cpu
from tests.lab_fixtures import needs_root
from tests.test_backend_bpf import (  # noqa: F401 (plane, farm, budget: the tc program's fixtures)
    BACKEND,
    CLIENT4,
    CLIENT6,
    ETHER,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TW_PORT,
    UNSOUND_OUTER,
    VIPS,
    budget,
    encapsulated,
    farm,
    plane,
    run,
    run_in,
    server_side_time_wait,
    with_outer_ipv4,
)

pytestmark = needs_root
XDP_DROP, XDP_PASS = 1, 2
FASTOPEN = 0x08  # the next free flag (h-tfo2): any flag, known or not, leaves the packet to the tc program


@pytest.fixture(scope="module")
def stage(plane):  # noqa: F811
    stage = XdpStage(plane)
    yield stage
    stage.close()


@pytest.fixture(scope="module")
def connection():
    """A namespace of the test's own (the programs look sockets up in the caller's) holding a connection
    to the VIP from each client address, IPv4 and IPv6; yields its name and the clients' ports."""
    with netns.connections_on_loopback("spbx", 80, (VIPS[0], CLIENT4), (VIPS[1], CLIENT6)) as connected:
        yield connected


def xdp_run(stage: XdpStage, packet: bytes) -> tuple[int, bytes, dict]:
    before = read_xdp_counters(stage.counters)
    verdict, out = prog_test_run(stage.prog_fd, packet)
    after = read_xdp_counters(stage.counters)
    return verdict, out, {name: after[name] - before[name] for name in XDP_COUNTERS if after[name] != before[name]}


def segment(client: str, sport: int, flags: str = "A", payload: bytes = b"", dport: int = 80) -> bytes:
    layer = IP(src=client, dst=VIPS[0]) if ":" not in client else IPv6(src=client, dst=VIPS[1])
    return raw(layer / TCP(sport=sport, dport=dport, flags=flags, seq=7, ack=9) / payload)


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_a_connections_unflagged_segments_are_stripped_as_the_tc_program_strips_them(stage, plane, connection,  # noqa: F811
                                                                                      client):
    """The frame out is the tc program's own output for the same packet, and the tc program then passes it
    as plain traffic, untouched: the stack receives the same bytes either way. Bare segments too (an ACK, a
    FIN, a RST of the connection): the tc program's work for them (decapsulation, MAC, lookup) is done here
    once."""
    name, ports = connection
    with netns.inside(name):
        for flags, payload in (("PA", bytes(range(256)) * 5), ("A", b"x"), ("FPA", b"bye"), ("RA", b"x"),
                               ("A", b""), ("FA", b""), ("R", b"")):
            packet = encapsulated(segment(client, ports[client], flags, payload), flags=0)
            tc_verdict, tc_out, tc_changed = run(plane, packet)
            assert (tc_verdict, tc_changed) == (TC_ACT_OK, {"decapsulated": 1}), flags
            verdict, out, changed = xdp_run(stage, packet)
            assert (verdict, out, changed) == (XDP_PASS, tc_out, {"decapsulated": 1}), flags
            assert run(plane, out) == (TC_ACT_OK, out, {"passed": 1}), flags


def test_everything_else_reaches_the_tc_program_untouched(stage, connection):
    """Flagged packets (whatever the flag, FASTOPEN too), a SYN, and what fails a check of the tc
    program's: passed unchanged, for it to decide."""
    name, ports = connection
    sport = ports[CLIENT4]
    owned = segment(CLIENT4, sport, "PA", b"data")
    flagged = [encapsulated(owned, flags=flag) for flag in (encap.FLAG_VALIDATED, encap.FLAG_ICMP,
                                                            encap.FLAG_CHAINED, FASTOPEN)]
    left = [
        encapsulated(segment(CLIENT4, sport, "S", b"data"), flags=0),                 # a SYN: never forwarded
        encapsulated(segment(CLIENT4, sport, "PA", b"data", dport=22), flags=0),      # not a protected port
        encapsulated(owned, flags=0, key=bytes(16)),                                   # a MAC of another key
        encapsulated(owned, flags=0, mac_for=("198.18.10.9", "198.18.20.2")),         # a MAC for other addresses
        encapsulated(owned, flags=0, source="198.18.99.9"),                           # an untrusted front
        encapsulated(owned, flags=0, magic=0x5D),
        encapsulated(owned, flags=0, version=2),
        encapsulated(owned, flags=0)[:-len(owned)] + b"\x50" + owned[1:],            # inner version 5
        with_outer_ipv4(encapsulated(owned, flags=0)[:-len(owned) + 10]),             # inner packet cut short
        *(unsound(encapsulated(owned, flags=0)) for unsound in UNSOUND_OUTER.values()),  # no front's outer IPv4
    ]
    with netns.inside(name):
        assert xdp_run(stage, encapsulated(owned, flags=0))[0::2] == (XDP_PASS, {"decapsulated": 1})
        for expected, packets in (({"flagged": 1}, flagged), ({"left": 1}, left), ({}, [ETHER + owned])):
            for index, packet in enumerate(packets):
                assert xdp_run(stage, packet) == (XDP_PASS, packet, expected), (expected, index)


def attached_in(name: str, interface: str) -> tuple[int, int] | None:
    with netns.inside(name):
        return xdp_attached_program(interface_index(interface))


def test_the_stage_attaches_natively_turns_gro_on_and_replaces_a_dead_backends(plane, capsys):  # noqa: F811
    """On a veth: attached in native mode with GRO turned on, detached on exit; a stage a killed backend
    left (here: one attached and not detached) is removed first."""
    name = netns.unique_name("spbg")
    with netns.namespaces(name):
        netns.link(name, "bga", name, "bgb")
        with netns.inside(name):
            left = XdpStage(plane)
            xdp_attach(interface_index("bga"), left.prog_fd, XDP_FLAGS_DRV_MODE)
            left_id = program_id(left.prog_fd)
            left.close()  # the program stays, held by the interface, as a dead backend's would
            with xdp_stage(plane, "bga", interface_index("bga")) as stage:
                assert stage is not None
                assert attached_in(name, "bga") == (program_id(stage.prog_fd), XDP_FLAGS_DRV_MODE) != (left_id,
                                                                                                   XDP_FLAGS_DRV_MODE)
                assert "generic-receive-offload: on" in netns.run(name, ["ethtool", "-k", "bga"]).stdout
        assert attached_in(name, "bga") is None
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert events == ["xdp_leftover_detached", "backend_xdp_attached", "interface_gro_enabled"]


def test_without_native_xdp_or_with_another_program_the_tc_program_alone_decides(plane, capsys):  # noqa: F811
    """The loopback device has no native XDP; a veth whose XDP slot another program holds keeps it: no
    stage, logged, and nothing changed."""
    name = netns.unique_name("spbn")
    with netns.namespaces(name):
        netns.link(name, "bna", name, "bnb")
        with netns.inside(name), contextlib.closing(BpfObject(build_object("xdp_pass"))) as other:
            other_fd = other.program_fd("xdp_pass")
            xdp_attach(interface_index("bna"), other_fd, XDP_FLAGS_DRV_MODE)
            for interface in ("lo", "bna"):
                with xdp_stage(plane, interface, interface_index(interface)) as stage:
                    assert stage is None
            assert attached_in(name, "bna") == (program_id(other_fd), XDP_FLAGS_DRV_MODE)
            assert attached_in(name, "lo") is None
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(event["event"], event["interface"]) for event in events] == [("backend_xdp_unavailable", "lo"),
                                                                          ("backend_xdp_unavailable", "bna")]


# --- Forged ACKs: what the tc program would drop, dropped here ---

def refilled(plane) -> None:  # noqa: F811
    """Every CPU's reset budget full again (an earlier test may have spent it; time refills it slowly)."""
    plane.object.map("reset_budget").update(bytes(4), bytes(16))


def both(stage: XdpStage, plane, packet: bytes, farm=None) -> tuple:  # noqa: F811
    """The stage's verdict and counters for the packet, then the tc program's for the same packet (in that
    order, as they meet it; in the farm namespace when given): what the tc program would do without the
    stage. What the stage passes changed is the tc program's output, byte for byte."""
    verdict, out, changed = xdp_run(stage, packet)
    tc_verdict, tc_out, tc_changed = run_in(farm, plane, packet) if farm else run(plane, packet)
    assert verdict == XDP_DROP or out in (packet, tc_out)
    return verdict, changed, tc_verdict, tc_changed


DROPPED = (XDP_DROP, {"no_flow_dropped": 1}, TC_ACT_SHOT, {"decapsulated": 1, "no_flow_dropped": 1})
RESET = (XDP_PASS, {"no_flow_reset": 1}, TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_a_forged_segment_beyond_the_reset_budget_ends_in_the_stage_as_in_the_tc_program(plane, stage, budget,  # noqa: F811
                                                                                        connection, client):
    """No connection owns it (the listener alone, or no socket: port 443), the header names no former
    owner, the budget has no token: dropped and counted; bare or not, ACK or FIN."""
    name, ports = connection
    budget(0)
    with netns.inside(name):
        for flags, payload, dport in (("A", b"", 80), ("FA", b"", 80), ("PA", b"data", 80), ("A", b"", 443)):
            packet = encapsulated(segment(client, ports[client] + 1, flags, payload, dport), flags=0)
            assert both(stage, plane, packet) == DROPPED, (flags, dport)


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_within_the_budget_a_forged_ack_is_decapsulated_for_its_reset_and_the_token_spent_once(plane, stage, budget,  # noqa: F811
                                                                                                connection, client):
    """One token on this CPU: the stage takes it and passes the segment decapsulated, as the tc program would
    pass it for the kernel's RST; the tc program then meets plain TCP and passes it without a token. The
    next one is dropped by both."""
    name, ports = connection
    budget(os.cpu_count() or 1)  # one reset per second per CPU, a burst of one
    refilled(plane)
    forged = encapsulated(segment(client, ports[client] + 1), flags=0)
    with netns.inside(name):
        verdict, out, changed = xdp_run(stage, forged)
        assert (verdict, changed) == (XDP_PASS, {"no_flow_reset": 1})
        assert run(plane, out) == (TC_ACT_OK, out, {"passed": 1})
        assert both(stage, plane, forged) == DROPPED


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_under_rps_the_stage_and_the_tc_program_agree_on_the_reset_budget(plane, stage, budget,  # noqa: F811
                                                                          connection, client):
    """RPS runs the tc program on another CPU than the stage's NAPI poll. One token per CPU; the tc
    program's CPU has spent its own. Each forged ACK meets the stage on one CPU, then, if passed, the tc
    program on the other: one reset (the stage's CPU's token), then drops, and never a packet the stage
    passed dropped by the tc program. Before, the stage peeked at its own CPU's bucket, which only the tc
    program spends, so it passed every forged ACK to a tc program with no token left."""
    name, ports = connection
    stage_cpu, tc_cpu = 0, 1  # the budget fixture pins the test to one CPU: on_cpu moves it
    budget(os.cpu_count() or 1)  # one reset per second per CPU, a burst of one
    refilled(plane)
    forged = encapsulated(segment(client, ports[client] + 1), flags=0)
    with netns.inside(name):
        with on_cpu(tc_cpu):
            assert run(plane, forged)[0::2] == (TC_ACT_OK, {"decapsulated": 1, "no_flow_reset": 1})
        outcomes = []
        for _ in range(3):
            with on_cpu(stage_cpu):
                verdict, out, changed = xdp_run(stage, forged)
            with on_cpu(tc_cpu):
                outcomes.append((changed, run(plane, out)[0::2] if verdict == XDP_PASS else None))
    assert outcomes == [({"no_flow_reset": 1}, (TC_ACT_OK, {"passed": 1}))] + [({"no_flow_dropped": 1}, None)] * 2


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_a_clients_rst_of_no_connection_ends_in_the_stage_even_within_the_budget(plane, stage, budget,  # noqa: F811
                                                                                 connection, client):
    name, ports = connection
    budget(1000)
    refilled(plane)
    with netns.inside(name):
        for flags in ("R", "RA"):
            assert both(stage, plane, encapsulated(segment(client, ports[client] + 1, flags), flags=0)) == DROPPED, flags
        assert both(stage, plane, encapsulated(segment(client, ports[client] + 1), flags=0)) == RESET


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
def test_a_connections_segments_are_unchanged_with_no_budget(plane, stage, budget, connection, client):  # noqa: F811
    """Bare or not, stripped, none dropped."""
    name, ports = connection
    budget(0)
    with netns.inside(name):
        for flags in ("A", "FA", "R", "RA"):
            packet = encapsulated(segment(client, ports[client], flags), flags=0)
            assert both(stage, plane, packet) == (XDP_PASS, {"decapsulated": 1}, TC_ACT_OK, {"decapsulated": 1}), flags
        packet = encapsulated(segment(client, ports[client], "PA", b"data"), flags=0)
        assert xdp_run(stage, packet)[0::2] == (XDP_PASS, {"decapsulated": 1})


def test_what_fails_a_tc_check_is_left_for_the_tc_program_to_count(plane, stage, budget, connection):  # noqa: F811
    """A forged ACK beyond the budget whose MAC is wrong, from an untrusted front, or a SYN: the tc
    program's own counters say why it drops them, as without the stage."""
    name, ports = connection
    budget(0)
    forged = segment(CLIENT4, ports[CLIENT4] + 1)
    with netns.inside(name):
        for packet, outcome in ((encapsulated(forged, flags=0, key=bytes(16)), "encap_bad_mac"),
                                (encapsulated(forged, flags=0, source="198.18.99.9"), "untrusted"),
                                (UNSOUND_OUTER["checksum wrong"](encapsulated(forged, flags=0)), "malformed"),
                                (encapsulated(segment(CLIENT4, 4000, "S"), flags=0), "encap_refused")):
            verdict, changed, tc_verdict, tc_changed = both(stage, plane, packet)
            assert (verdict, changed, tc_verdict, outcome in tc_changed) == (XDP_PASS, {"left": 1}, TC_ACT_SHOT,
                                                                             True), outcome


@pytest.mark.parametrize("former", [("198.18.21.2", "0.0.0.0"), ("0.0.0.0", "198.18.22.2"), (BACKEND, "198.18.21.2")])
def test_a_segment_naming_a_former_owner_goes_on_along_the_chain(plane, stage, budget, farm, former):  # noqa: F811
    """No connection here, no budget, but the header names a former owner that is not this backend:
    left, and the tc program passes it on."""
    budget(0)
    for client in (CLIENT4, CLIENT6):
        packet = encapsulated(segment(client, 4000), flags=0, former=former)
        assert both(stage, plane, packet, farm) == (XDP_PASS, {"left": 1}, TC_ACT_REDIRECT,
                                             {"decapsulated": 1, "chained": 1}), client


@pytest.mark.parametrize("former", [("0.0.0.0", "0.0.0.0"), (BACKEND, "0.0.0.0"), (BACKEND, BACKEND)])
def test_naming_no_former_owner_but_itself_is_the_last_hop(plane, stage, budget, farm, former):  # noqa: F811
    budget(0)
    assert both(stage, plane, encapsulated(segment(CLIENT4, 4000), flags=0, former=former), farm) == DROPPED


def test_a_later_connections_segment_meeting_a_time_wait_socket_is_left_to_the_tc_program(plane, stage, budget):  # noqa: F811
    """A segment from a TIME_WAIT socket's tuple acknowledging what that connection never sent is a later
    connection's (flow_owner): the stage leaves it encapsulated, without spending the budget, since only
    the tc program can deliver it past the TIME_WAIT socket to the listener (bpf_sk_assign, which needs a
    real tc ingress: tests/test_backend_e2e.py and tests/test_lab.py run it there). Before, the stage
    decapsulated it for the TIME_WAIT socket, which answered with an ACK."""
    budget(1000)
    refilled(plane)
    with server_side_time_wait() as (tw_farm, rcv_nxt, _):
        inner = raw(IP(src=CLIENT4, dst=VIPS[0]) / TCP(sport=TW_PORT, dport=80, flags="PA", seq=(rcv_nxt + 5000) % 2**32,
                                                        ack=12345) / b"GET / HTTP/1.0\r\n\r\n")
        packet = tw_farm[2] + encapsulated(inner, flags=0)[6:]
        with netns.inside(tw_farm[0]):
            verdict, out, changed = xdp_run(stage, packet)
        assert (verdict, changed, out) == (XDP_PASS, {"left": 1}, packet)
