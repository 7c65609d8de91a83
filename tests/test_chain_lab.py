"""Established connections survive backend changes (issue 14, item 1), in the lab: long-lived echo
connections exchange data byte for byte while, under a SYN flood, every front is reloaded (SIGHUP) with a
backend added, a backend removed while still running, a drain, and a weight change.

Run under the lab lock: `flock /tmp/synproxy-lab.lock python3 -m pytest -q -s tests/test_chain_lab.py`.
Before the chain, removing a backend from the fronts' list reset the connections Maglev moved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from synproxy.lab.topology import VIP, Lab, default_hosts
from tests.lab_fixtures import backend_stats, needs_root, running_lab
from tests.test_lab_robustness import reload_fronts

pytestmark = [pytest.mark.netns, needs_root]
PYTHON = sys.executable
CONNECTIONS = 48
# In the client namespace: open CONNECTIONS echo connections from consecutive source ports, then round
# after round send each a random payload and read it back, until the stop file appears (bounded by a
# deadline); print each one's rounds and the first error. Each test uses its own ports: a connection the
# control broke leaves its server socket on the backend, which a reused 4-tuple would meet.
HOLDER = """
import json, os, random, socket, sys, time
count, stop_file, deadline = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
rng = random.Random(14)
connections = [socket.create_connection((sys.argv[4], 7), timeout=2, source_address=("", int(sys.argv[5]) + i))
               for i in range(count)]
state = [{"rounds": 0, "bytes": 0, "error": None} for _ in connections]
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
            record["error"] = f"{type(error).__name__}: {error} after {time.monotonic() - started:.1f} s"
    time.sleep(0.1)
print(json.dumps(state), flush=True)
"""


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


def set_window(lab: Lab, seconds: float | None) -> None:
    """front.previous_table_seconds: ``seconds``, or the default when None."""
    text = lab.config_path.read_text()
    text = "".join(line for line in text.splitlines(keepends=True) if "previous_table_seconds" not in line)
    if seconds is not None:
        text = text.replace("front:\n", f"front:\n  previous_table_seconds: {seconds}\n")
    lab.config_path.write_text(text)


def changes_under_a_flood(lab: Lab, first_port: int) -> tuple[list[dict], int, dict]:
    """The four changes, each a SIGHUP of every front, while CONNECTIONS echo connections opened before
    them exchange data and the attacker floods SYNs; each connection's record, SYNs sent, chained counts.
    The fronts start afresh with three backends: no earlier change is in their history (a packet names two
    former owners, docs/backend.md)."""
    write_backends(lab, ["{backend0}", "{backend1}", "{backend2}"])
    for host in lab.by_role("front"):
        lab.stop_process(host.name)
        lab.start_front(host.name)
    stop_file = lab.state_dir / "holder.stop"
    stop_file.unlink(missing_ok=True)
    holder = lab.popen("client", [PYTHON, "-c", HOLDER, str(CONNECTIONS), str(stop_file), "120", VIP, str(first_port)],
                       stdout=subprocess.PIPE, text=True)
    before = {host.name: backend_stats(lab, host.name)["chained"] for host in lab.by_role("backend")}
    flood, sent = None, 0
    try:
        assert json.loads(holder.stdout.readline()) == {"opened": CONNECTIONS}
        flood = lab.popen("attacker", [PYTHON, "-m", "synproxy.lab.flood", "--target", VIP, "--port", "7",
                                       "--count", "2000000", "--seconds", "40", "--rate", "5000"],
                          stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        for entries in (["{backend0}", "{backend1}", "{backend2}", "{backend3}"],      # added
                        ["{backend1}", "{backend2}", "{backend3}"],                   # removed, still running
                        ["{{address: {backend1}, drain: true}}", "{backend2}", "{backend3}"],  # drained
                        ["{{address: {backend1}, drain: true}}", "{{address: {backend2}, weight: 3}}",
                         "{backend3}"]):                                              # reweighted
            write_backends(lab, entries)
            reload_fronts(lab)
            time.sleep(3)
        assert flood.poll() is None, "the changes happened under the flood"
    finally:
        stop_file.touch()
        state = json.loads(holder.communicate(timeout=200)[0].splitlines()[-1])
        if flood is not None:
            sent = json.loads(flood.communicate(timeout=60)[0])["sent"]
    after = {host.name: backend_stats(lab, host.name) for host in lab.by_role("backend")}
    chained = {name: stats["chained"] - before[name] for name, stats in after.items()}
    print("\nbackend counters:", json.dumps({name: {key: stats[key] for key in (
        "chained", "chain_failed", "no_flow_reset", "no_flow_dropped", "created")} for name, stats in after.items()}))
    kept = sum(record["error"] is None for record in state)
    print(f"\nconnections kept: {kept} of {CONNECTIONS}; rounds each: {min(r['rounds'] for r in state)}–"
          f"{max(r['rounds'] for r in state)}; bytes echoed: {sum(r['bytes'] for r in state)}; "
          f"SYNs flooded: {sent}; chained by backend: {chained}; errors: "
          f"{sorted(record['error'] for record in state if record['error'])}")
    return state, sent, chained


def test_long_lived_connections_survive_an_add_a_removal_a_drain_and_a_weight_change_under_a_flood(lab):
    state, sent, chained = changes_under_a_flood(lab, 20000)
    assert [record["error"] for record in state] == [None] * CONNECTIONS
    assert min(record["rounds"] for record in state) >= 40, "every connection kept exchanging data"
    assert sent > 10_000 and sum(chained.values()) > 0


def test_without_a_window_only_the_drained_backends_connections_survive(lab):
    """The control: previous_table_seconds 0 chains nothing but to the draining backend, as before the
    chain a change reset the connections Maglev moved."""
    set_window(lab, 0)
    try:
        state, _, _ = changes_under_a_flood(lab, 21000)
    finally:
        set_window(lab, None)
    assert sum(record["error"] is not None for record in state) >= CONNECTIONS // 4
