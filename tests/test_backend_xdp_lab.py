"""The backend's XDP stage in the lab (default front data plane): an upload through a front arrives byte for
byte, its segments stripped before GRO and coalesced; a backend killed with the stage attached leaves it,
and the next start replaces it."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from synproxy.backend.loader import XDP_PROGRAM
from synproxy.bpf.libbpf import program_name, xdp_attached_program
from synproxy.lab.topology import ECHO_PORT, VIP, Lab
from synproxy.netns import inside
from tests.lab_fixtures import backend_stats, needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]
UPLOAD_BYTES = 8 << 20
# The client sends a pattern to the echo server through the VIP (through a front, encapsulated, to the
# backend) while it reads the answer (direct from the backend), and compares what came back.
ECHO_UPLOAD = """
import hashlib, json, socket, sys, threading
size, chunk = int(sys.argv[2]), bytes(range(256)) * 256
sent = (chunk * (size // len(chunk) + 1))[:size]
received = bytearray()
with socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=30) as sock:
    def read():
        while len(received) < size and (piece := sock.recv(1 << 16)):
            received.extend(piece)
    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(sent)
    reader.join(30)
print(json.dumps({"sent": len(sent), "received": len(received), "same": bytes(received) == sent}))
"""


@pytest.fixture(scope="module")
def lab():
    with running_lab("spxd") as lab:
        yield lab


def stage_counts(lab: Lab) -> dict:
    """The XDP stage's and the tc program's counters, summed over the backends."""
    totals: dict = {}
    for host in lab.by_role("backend"):
        stats = backend_stats(lab, host.name)
        for name, value in {**{f"xdp_{k}": v for k, v in stats["xdp"].items()}, "passed": stats["passed"],
                            "decapsulated": stats["decapsulated"]}.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def attached_stage(lab: Lab, host: str) -> int:
    with inside(lab.ns(host)):
        from synproxy.bpf.loading import interface_index
        prog_id, _ = xdp_attached_program(interface_index("eth0"))
        assert program_name(prog_id) == XDP_PROGRAM[:15]
        return prog_id


def test_an_upload_through_a_front_arrives_byte_for_byte_stripped_before_gro(lab):
    before = stage_counts(lab)
    result = json.loads(lab.run("client", [sys.executable, "-c", ECHO_UPLOAD, VIP, str(UPLOAD_BYTES),
                                           str(ECHO_PORT)], timeout=60).stdout)
    assert result == {"sent": UPLOAD_BYTES, "received": UPLOAD_BYTES, "same": True}
    moved = {name: stage_counts(lab)[name] - value for name, value in before.items()}
    # Every data segment (at most 1460 bytes each) stripped by the stage; the tc program decapsulated only
    # the flagged handshake ACK and the client's bare ACKs (for the echoed bytes), and GRO made it see far
    # fewer packets than the stage stripped.
    assert moved["xdp_decapsulated"] >= UPLOAD_BYTES // 1460
    assert moved["decapsulated"] < moved["xdp_decapsulated"] // 10
    assert moved["passed"] < moved["xdp_decapsulated"] // 4
    for host in lab.by_role("backend"):
        assert "generic-receive-offload: on" in lab.run(host.name, ["ethtool", "-k", "eth0"]).stdout


def test_a_killed_backends_stage_is_replaced_by_the_next_start(lab):
    host = lab.by_role("backend")[0].name
    left = attached_stage(lab, host)
    lab.stop_process(host, signal.SIGKILL)
    assert attached_stage(lab, host) == left  # still there: nothing detached it
    lab.start_backend(host)
    assert attached_stage(lab, host) != left
    log = (lab.state_dir / "logs" / f"{host}.log").read_text()
    assert f'"program_id": {left}' in log and "xdp_leftover_detached" in log
    test_an_upload_through_a_front_arrives_byte_for_byte_stripped_before_gro(lab)
