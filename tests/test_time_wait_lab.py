"""4-tuple reuse through the fronts (issue 14), with the backends' default sysctls (TIME_WAIT kept): a client
that reconnects from the same address and port to a server that closes first (the lab's nginx, answering
an HTTP/1.0 request) meets the previous connection's TIME_WAIT socket on the backend; each reconnection
must complete, without waiting for a retransmission: whether the client sends its request right behind its
handshake ACK (as ab and curl do) or only later."""

from __future__ import annotations

import json
import statistics
import sys
import textwrap

import pytest

from synproxy.lab.topology import VIP, VIP6
from tests.lab_fixtures import backend_stats, needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]
RECONNECTS = 10


@pytest.fixture(scope="module")
def lab():
    with running_lab("sptwl") as lab:
        yield lab


# From one source port, RECONNECTS + 1 times: connect, wait `pause` seconds, one HTTP/1.0 request, read
# until the server's FIN (so the server closes first and keeps the TIME_WAIT), close. Prints one JSON
# line: seconds per request (connect to end of answer, the pause left out), and the failures.
RECONNECTING_CLIENT = textwrap.dedent("""
    import errno, json, socket, sys, time
    vip, source, port, count, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    times, failures = [], []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(5)
        for _ in range(100):  # our last close may still be in LAST_ACK for a moment
            try:
                sock.bind((source, port))
                break
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                time.sleep(0.01)
        started = time.monotonic()
        try:
            sock.connect((vip, 80))
            time.sleep(pause)
            sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.split(b" ", 2)[1:2] == [b"200"], answer[:40]  # nginx answers 1.0 as HTTP/1.1
            times.append(time.monotonic() - started - pause)
        except (OSError, AssertionError) as error:
            failures.append(repr(error))
        sock.close()
    print(json.dumps({"times": times, "failures": failures}))
""")


@pytest.mark.parametrize("family, client, port, pause", [
    (4, "198.18.1.2", 45000, 0), (6, "2001:db8:1::2", 45001, 0),  # the request right behind the ACK
    (4, "198.18.1.2", 45002, 0.05), (6, "2001:db8:1::2", 45003, 0.05),  # only the ACK meets the TIME_WAIT
], ids=["IPv4 request at once", "IPv6 request at once", "IPv4 request later", "IPv6 request later"])
def test_reconnects_from_one_source_port_after_a_server_first_close_all_connect_at_once(
        lab, family, client, port, pause):
    vip = VIP6 if family == 6 else VIP
    before = sum(backend_stats(lab, h.name)["time_wait_recycled"] for h in lab.by_role("backend"))
    done = lab.run("client", [sys.executable, "-c", RECONNECTING_CLIENT, vip, client, str(port),
                              str(RECONNECTS + 1), str(pause)], timeout=120)
    result = json.loads(done.stdout)
    recycled = sum(backend_stats(lab, h.name)["time_wait_recycled"] for h in lab.by_role("backend")) - before
    reconnects = result["times"][1:]
    print(f"\nIPv{family}: first {result['times'][:1]} s; {len(reconnects)} reconnects, median "
          f"{statistics.median(reconnects) if reconnects else None} s, min {min(reconnects, default=None)}, "
          f"max {max(reconnects, default=None)}; recycled {recycled}; failures {result['failures']}; "
          f"all {[round(t, 4) for t in reconnects]}")
    assert result["failures"] == [] and len(reconnects) == RECONNECTS
    # Well within a retransmission of the client's ACK or request (Linux's first after >= 200 ms): the
    # segments that met the TIME_WAIT socket were re-injected, not sent again by the client.
    assert max(reconnects) < 0.05
    assert recycled >= RECONNECTS
