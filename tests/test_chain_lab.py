"""Established connections survive backend changes (issue 14, item 1), in the lab: long-lived echo
connections, spread over every front by the router's ECMP, exchange data byte for byte while, under a SYN
flood, every front is reloaded (SIGHUP) with a backend added, a backend removed while still running, a
drain and a weight change, in several orders (one of them random, its seed printed); in one order the
fronts apply each change one after the other, as a SIGHUP sent front by front would. And a connection
whose backend died ends with an error within a bounded time instead of hanging.

Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q -s tests/test_chain_lab.py`
(SYNPROXY_CHAIN_ORDER_SEED=N repeats a random order). Before the chain, removing a backend from the
fronts' list reset the connections Maglev moved.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, default_hosts, scrape
from tests.lab_fixtures import backend_stats, needs_root, running_lab
from tests.test_lab_robustness import reload_fronts

pytestmark = [pytest.mark.netns, needs_root]
PYTHON = sys.executable
CONNECTIONS = 48
# In the client namespace: open CONNECTIONS echo connections from consecutive source ports, then round
# after round send each a random payload and read it back, until the stop file appears (bounded by a
# deadline); print each one's rounds and the first error, with the monotonic time it came (the test's
# clock: CLOCK_MONOTONIC is the machine's). Each test uses its own ports: a connection the control broke
# leaves its server socket on the backend, which a reused 4-tuple would meet.
HOLDER = """
import json, os, random, socket, sys, time
count, stop_file, deadline = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
timeout = float(sys.argv[6])
rng = random.Random(14)
connections = [socket.create_connection((sys.argv[4], 7), timeout=timeout,
                                        source_address=("", int(sys.argv[5]) + i)) for i in range(count)]
state = [{"rounds": 0, "bytes": 0, "error": None, "failed_at": None} for _ in connections]
started = time.monotonic()
print(json.dumps({"opened": count}), flush=True)
while not os.path.exists(stop_file) and time.monotonic() < deadline:
    for connection, record in zip(connections, state):
        if record["error"]:
            continue
        payload = rng.randbytes(rng.randrange(1, 4000))
        try:
            connection.sendall(payload)
            echoed = b""
            while len(echoed) < len(payload):
                chunk = connection.recv(65536)
                if not chunk:
                    raise ConnectionError("closed by the server")
                echoed += chunk
            if echoed != payload:
                raise ValueError("echoed bytes differ")
            record["rounds"] += 1
            record["bytes"] += len(payload)
        except (OSError, ValueError) as error:
            record["failed_at"] = time.monotonic()
            record["error"] = f"{type(error).__name__}: {error} after {record['failed_at'] - started:.1f} s"
    time.sleep(0.1)
print(json.dumps(state), flush=True)
"""
# The four changes, each from the fronts' starting list (backend0, backend1, backend2), in any order.
CHANGES = ("add", "remove", "drain", "reweight")


def order_seed() -> int:
    """The random order's seed: SYNPROXY_CHAIN_ORDER_SEED repeats a run; otherwise new every run."""
    return int(os.environ.get("SYNPROXY_CHAIN_ORDER_SEED") or random.SystemRandom().randrange(2**32))


SEED = order_seed()
# (the holder's first port, the order, whether the fronts apply each change one after the other)
ORDERS = [(20000, CHANGES, False), (20100, CHANGES[::-1], True),
          (20200, tuple(random.Random(SEED).sample(CHANGES, len(CHANGES))), False)]


@pytest.fixture(scope="module")
def lab():
    with running_lab("sprch", hosts=default_hosts(fronts=3, backends=4)) as lab:
        yield lab


def write_backends(lab: Lab, entries: list[str]) -> None:
    """The `backends` list, each entry an address or a flow mapping, by backend name ({backend1} ...)."""
    addresses = {host.name: host.address for host in lab.by_role("backend")}
    text = lab.config_path.read_text()
    start = text.index("backends: [")
    end = text.index("]\n", start)
    listed = ", ".join(entry.format(**addresses) for entry in entries)
    lab.config_path.write_text(f"{text[:start]}backends: [{listed}{text[end:]}")


def backends_after(applied: set[str]) -> list[str]:
    """The fronts' list once the ``applied`` changes are made: backend3 added, backend0 removed (it keeps
    running), backend1 drained, backend2's weight 3."""
    return [*([] if "remove" in applied else ["{backend0}"]),
            "{{address: {backend1}, drain: true}}" if "drain" in applied else "{backend1}",
            "{{address: {backend2}, weight: 3}}" if "reweight" in applied else "{backend2}",
            *(["{backend3}"] if "add" in applied else [])]


def set_window(lab: Lab, seconds: float | None) -> None:
    """front.previous_table_seconds: ``seconds``, or the default when None."""
    text = lab.config_path.read_text()
    text = "".join(line for line in text.splitlines(keepends=True) if "previous_table_seconds" not in line)
    if seconds is not None:
        text = text.replace("front:\n", f"front:\n  previous_table_seconds: {seconds}\n")
    lab.config_path.write_text(text)


def restart_fronts(lab: Lab, entries: list[str]) -> None:
    """The fronts start afresh with ``entries``: no earlier change is in their history (a packet names two
    former owners, docs/backend.md)."""
    write_backends(lab, entries)
    for host in lab.by_role("front"):
        lab.stop_process(host.name)
        lab.start_front(host.name)


def hold(lab: Lab, first_port: int, timeout: float = 2, count: int = CONNECTIONS) -> tuple[subprocess.Popen, object]:
    """The holder's process, once its connections are open, and its stop file."""
    stop_file = lab.state_dir / "holder.stop"
    stop_file.unlink(missing_ok=True)
    holder = lab.popen("client", [PYTHON, "-c", HOLDER, str(count), str(stop_file), "120", VIP, str(first_port),
                                  str(timeout)], stdout=subprocess.PIPE, text=True)
    assert json.loads(holder.stdout.readline()) == {"opened": count}
    return holder, stop_file


def released(holder: subprocess.Popen, stop_file) -> list[dict]:
    """Stop the holder; each connection's record."""
    stop_file.touch()
    return json.loads(holder.communicate(timeout=200)[0].splitlines()[-1])


def forwarded_by_front(lab: Lab) -> dict[str, float]:
    """Each front's packets encapsulated to a backend (queue and programs) since it started."""
    totals = {}
    for host in lab.by_role("front"):
        totals[host.name] = sum(value for (name, labels), value in scrape(lab, host.name, host.address,
                                                                          FRONT_METRICS_PORT).items()
                                if name in ("synproxy_front_packets_total", "synproxy_front_kernel_packets_total")
                                and dict(labels)["outcome"].startswith(("forwarded", "validated")))
    return totals


def changes_under_a_flood(lab: Lab, first_port: int, order: tuple[str, ...] = CHANGES,
                          one_front_at_a_time: bool = False) -> tuple[list[dict], int, dict, dict]:
    """The four changes in ``order``, each applied by every front (all at once, or one after the other
    0.5 s apart), while CONNECTIONS echo connections opened before them exchange data and the attacker
    floods SYNs; each connection's record, SYNs sent, chained counts, packets forwarded by each front."""
    restart_fronts(lab, backends_after(set()))
    holder, stop_file = hold(lab, first_port)
    before = {host.name: backend_stats(lab, host.name)["chained"] for host in lab.by_role("backend")}
    flood, sent, state = None, 0, []
    # Long enough for the changes (3 s after each, and a front's reload took up to ~1 s), no longer.
    flood_seconds = 4 + len(order) * (10 if one_front_at_a_time else 5)
    try:
        flood = lab.popen("attacker", [PYTHON, "-m", "synproxy.lab.flood", "--target", VIP, "--port", "7",
                                       "--count", "2000000", "--seconds", str(flood_seconds), "--rate", "5000"],
                          stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        changing = time.monotonic()
        for step in range(len(order)):
            write_backends(lab, backends_after(set(order[:step + 1])))
            if one_front_at_a_time:
                for host in lab.by_role("front"):
                    reload_fronts(lab, [host.name])
                    time.sleep(0.5)
            else:
                reload_fronts(lab)
            time.sleep(3)
        print(f"\nthe changes took {time.monotonic() - changing:.1f} s")
        assert flood.poll() is None, "the changes happened under the flood"
    finally:
        state = released(holder, stop_file)
        if flood is not None:
            sent = json.loads(flood.communicate(timeout=60)[0])["sent"]
    forwarded = forwarded_by_front(lab)
    after = {host.name: backend_stats(lab, host.name) for host in lab.by_role("backend")}
    chained = {name: stats["chained"] - before[name] for name, stats in after.items()}
    print("\nbackend counters:", json.dumps({name: {key: stats[key] for key in (
        "chained", "chain_failed", "no_flow_reset", "no_flow_dropped", "created")} for name, stats in after.items()}))
    kept = sum(record["error"] is None for record in state)
    print(f"\norder {', '.join(order)}{' (one front at a time)' if one_front_at_a_time else ''}: connections kept: "
          f"{kept} of {CONNECTIONS}; rounds each: {min(r['rounds'] for r in state)}–"
          f"{max(r['rounds'] for r in state)}; bytes echoed: {sum(r['bytes'] for r in state)}; "
          f"SYNs flooded: {sent}; forwarded by front: {forwarded}; chained by backend: {chained}; errors: "
          f"{sorted(record['error'] for record in state if record['error'])}")
    return state, sent, chained, forwarded


@pytest.mark.parametrize("first_port, order, one_front_at_a_time", ORDERS,
                         ids=["in order", "reversed, front by front", f"random (seed {SEED})"])
def test_long_lived_connections_survive_an_add_a_removal_a_drain_and_a_weight_change_under_a_flood(
        lab, first_port, order, one_front_at_a_time):
    state, sent, chained, forwarded = changes_under_a_flood(lab, first_port, order, one_front_at_a_time)
    rerun = f"order {order} (SYNPROXY_CHAIN_ORDER_SEED={SEED})"
    print(rerun)
    assert [record["error"] for record in state] == [None] * CONNECTIONS, rerun
    assert min(record["rounds"] for record in state) >= 40, "every connection kept exchanging data"
    assert sent > 10_000 and sum(chained.values()) > 0
    # The router's ECMP spreads the connections over the fronts: each carried some through the changes.
    assert all(count >= 100 for count in forwarded.values()), forwarded


def test_without_a_window_only_the_drained_backends_connections_survive(lab):
    """The control: previous_table_seconds 0 chains nothing but to the draining backend, as before the
    chain a change reset the connections Maglev moved."""
    set_window(lab, 0)
    try:
        state, _, _, _ = changes_under_a_flood(lab, 21000)
    finally:
        set_window(lab, None)
    assert sum(record["error"] is not None for record in state) >= CONNECTIONS // 4


def echo_clients(lab: Lab, backend: str, ports: range) -> set[int]:
    """Which of the client's ``ports`` have an established echo connection on ``backend`` (as indexes)."""
    shown = lab.run(backend, ["ss", "-Htn", "state", "established", "sport", "=", ":7"]).stdout
    found = {int(line.split()[-1].rsplit(":", 1)[1]) for line in shown.splitlines() if line.strip()}
    return {port - ports.start for port in found if port in ports}


def test_a_connection_whose_backend_died_ends_with_an_error_and_does_not_hang(lab):
    """Last in this module: it kills backend0's servers and cuts backend1 off. backend0 is removed from the
    fronts' list (its connections now chained to it), then its servers die: its connections end at once
    (the kernel closes their sockets). backend1 dies outright (its link down, nothing answers) and is
    listed `down: true` a second later: its connections' next segment goes to a backend that has none of
    them and names no former owner that does, so the last hop resets it (docs/backend.md). backend2's
    connections stay up. A 15 s socket timeout tells a reset from a hang."""
    restart_fronts(lab, backends_after(set()))
    ports = range(22000, 22024)
    holder, stop_file = hold(lab, ports.start, timeout=15, count=len(ports))
    on = {name: echo_clients(lab, name, ports) for name in ("backend0", "backend1", "backend2")}
    try:
        write_backends(lab, ["{backend1}", "{backend2}"])
        reload_fronts(lab)
        time.sleep(2)
        killed = time.monotonic()
        lab.stop_process("backend0-servers")
        time.sleep(3)
        lab.set_link("backend1", False)
        time.sleep(1)
        write_backends(lab, ["{{address: {backend1}, down: true}}", "{backend2}"])
        marked_down = time.monotonic()
        reload_fronts(lab)
        time.sleep(6)
    finally:
        lab.set_link("backend1", True)
        state = released(holder, stop_file)
    ended = {name: sorted((round(state[i]["failed_at"] - start, 3) if state[i]["failed_at"] else None,
                           state[i]["error"]) for i in on[name])
             for name, start in (("backend0", killed), ("backend1", marked_down), ("backend2", killed))}
    print(f"\nconnections per backend: { {name: len(indexes) for name, indexes in on.items()} }; seconds from "
          f"backend0's servers killed / backend1 listed down to each connection's error: {ended}")
    assert on["backend0"] and on["backend1"] and on["backend2"], on
    assert all(error and seconds < 3 for seconds, error in ended["backend0"]), ended["backend0"]
    assert all(error and "ConnectionResetError" in error and seconds < 7 for seconds, error in ended["backend1"]), \
        ended["backend1"]
    assert all(error is None for _, error in ended["backend2"]), ended["backend2"]
