"""The lab's fronts announce the VIPs by BGP to the router's BIRD, which installs one ECMP route through
every front that is ready: a front killed, frozen or drained leaves it within the bound (10 s), clients
keep connecting meanwhile, and a restarted front is routed again.

Each test prints a `measured:` line (run with -s to see them); docs/front.md quotes them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from synproxy.lab.routing import next_hops
from synproxy.lab.topology import VIP, VIP6
from tests.lab_fixtures import needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]
BOUND_SECONDS = 10

# Echo round trips to the VIP, one after the other, for SECONDS: how many failed (no connection within
# 3 s, or the data did not come back) and how many were slow (a SYN or a segment retransmitted: > 0.5 s).
CLIENT_LOOP = textwrap.dedent("""
    import json, sys, time
    from synproxy.lab.clients import echo
    target, seconds = sys.argv[1], float(sys.argv[2])
    started = time.monotonic()
    attempts, failed, slow = 0, [], []
    while time.monotonic() - started < seconds:
        at = time.monotonic()
        attempts += 1
        try:
            echo(target, 7, 3.0, b"x" * 100)
            if time.monotonic() - at > 0.5:
                slow.append(round(at - started, 2))
        except OSError as error:
            failed.append([round(at - started, 2), str(error)])
        time.sleep(0.01)
    print(json.dumps({"attempts": attempts, "failed": failed, "slow": slow}))
""")


@pytest.fixture(scope="module", params=["auto", "nfqueue"])
def lab(request):
    """The default data plane (XDP: a killed or frozen front's program still answers in the kernel) and
    NFQUEUE (a killed front's queue drops until the router moves its share)."""
    with running_lab("spg", data_plane=request.param) as lab:
        yield lab


def client_loop(lab, seconds: float, vip: str = VIP) -> subprocess.Popen:
    return lab.popen("client", [sys.executable, "-c", CLIENT_LOOP, vip, str(seconds)], stdout=subprocess.PIPE,
                     text=True)


def finished(loop: subprocess.Popen) -> dict:
    return json.loads(loop.communicate(timeout=60)[0])


def test_the_router_learns_the_vips_by_bgp_with_three_next_hops(lab):
    fronts = lab.by_role("front")
    assert next_hops(lab.ns("router"), VIP) == {h.address for h in fronts}
    assert next_hops(lab.ns("router"), VIP6) == {h.address6 for h in fronts}
    route = lab.run("router", ["ip", "route", "show", f"{VIP}/32"]).stdout
    assert "proto bird" in route, route
    assert lab.status()["announcements"] == {h.name: {"session": "Established", "routed": True} for h in fronts}


def test_a_killed_front_is_withdrawn_at_once_clients_keep_connecting_and_a_restart_announces_again(lab):
    loop = client_loop(lab, 8)
    time.sleep(2)
    lab.stop_process("front1", signal.SIGKILL)
    withdrawn = lab.wait_for_route("front1", announced=False, seconds=BOUND_SECONDS)
    result = finished(loop)
    print(f"measured: {lab.data_plane}: kill -9: withdrawn after {withdrawn:.2f} s; {result['attempts']} round trips, "
          f"{len(result['failed'])} failed, {len(result['slow'])} slow (> 0.5 s)")
    assert withdrawn < BOUND_SECONDS
    assert not result["failed"], result
    started = time.monotonic()
    lab.start_front("front1")  # waits until the router routes through it again
    print(f"measured: {lab.data_plane}: restart: announced and routed {time.monotonic() - started:.2f} s after the start")
    assert lab.routed_fronts() == {"front0": True, "front1": True, "front2": True}


def test_a_frozen_front_is_withdrawn_by_the_hold_timer(lab):
    pid = lab.pid("front2")
    loop = client_loop(lab, 10)
    time.sleep(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        withdrawn = lab.wait_for_route("front2", announced=False, seconds=BOUND_SECONDS)
    finally:
        os.kill(pid, signal.SIGCONT)
    result = finished(loop)
    print(f"measured: {lab.data_plane}: SIGSTOP: withdrawn after {withdrawn:.2f} s; {result['attempts']} round trips, "
          f"{len(result['failed'])} failed, {len(result['slow'])} slow (> 0.5 s)")
    assert withdrawn < BOUND_SECONDS
    lab.wait_for_route("front2", announced=True)  # thawed, it connects again


def test_a_drained_front_loses_no_connection_and_announces_again_when_undrained(lab):
    loop = client_loop(lab, 6, VIP6)
    time.sleep(1)
    started = time.monotonic()
    drained = lab.run("front0", [sys.executable, "-m", "synproxy.cli", "front", "--config", str(lab.config_path),
                                 "--drain", "--timeout", "20"], check=False)
    took = time.monotonic() - started
    assert drained.returncode == 0, drained.stderr
    assert not lab.routed_fronts()["front0"]
    result = finished(loop)
    print(f"measured: {lab.data_plane}: --drain: returned after {took:.2f} s ({drained.stdout.strip()}); {result['attempts']} round "
          f"trips, {len(result['failed'])} failed, {len(result['slow'])} slow (> 0.5 s)")
    assert not result["failed"] and not result["slow"], result
    lab.run("front0", [sys.executable, "-m", "synproxy.cli", "front", "--config", str(lab.config_path), "--undrain"])
    lab.wait_for_route("front0", announced=True)
