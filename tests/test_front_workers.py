"""A front with several workers (front.workers, docs/front.md) in the lab, NFQUEUE mode, one front.

Clients pinned to each CPU make the front's receive path run on that CPU, so --queue-cpu-fanout puts
their packets in that CPU's queue: both workers must answer, the metrics must add them up, a worker
killed with SIGKILL must come back, SIGHUP must reach each worker, and killing the front must take its
workers along. Last, a front started in NFQUEUE mode must remove the XDP and tc programs a killed
front left on its interface.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, default_hosts, scrape
from synproxy.netns import pids_inside
from tests.lab_fixtures import backend_stats, needs_root, running_lab

pytestmark = [pytest.mark.netns, needs_root]
PYTHON = sys.executable
FRONT = "front0"
CPUS = (0, 1)


@pytest.fixture(scope="module")
def lab():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")
    with running_lab("spw", hosts=default_hosts(fronts=1), data_plane="nfqueue", workers=2) as lab:
        yield lab


def clients_on(lab: Lab, cpu: int, count: int) -> dict:
    """The lab's clients, pinned to one CPU: the router and the front receive their packets on it."""
    return json.loads(lab.run("client", ["taskset", "-c", str(cpu), PYTHON, "-m", "synproxy.lab.clients",
                                         "--target", VIP, "--count", str(count), "--timeout", "5"],
                              timeout=120).stdout)


def front_metrics(lab: Lab) -> dict[tuple, float]:
    front = lab.by_role("front")[0]
    return scrape(lab, FRONT, front.address, FRONT_METRICS_PORT)


def worker_packets(samples: dict) -> dict[str, float]:
    return {dict(labels)["queue"]: value for (name, labels), value in samples.items()
            if name == "synproxy_front_worker_packets_total"}


def events(lab: Lab, name: str) -> list[dict]:
    log = (lab.state_dir / "logs" / f"{FRONT}.log").read_text()
    return [entry for line in log.splitlines() if line.startswith("{")
            and (entry := json.loads(line))["event"] == name]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def workers(lab: Lab) -> dict[int, int]:
    """Each queue's worker now: queue -> PID (its latest worker_started)."""
    return {entry["queue"]: entry["pid"] for entry in events(lab, "worker_started")}


def test_both_queues_answer_and_the_metrics_add_them_up(lab):
    before = worker_packets(front_metrics(lab))
    assert set(before) == {"0", "1"}
    for cpu in CPUS:
        made = clients_on(lab, cpu, 10)
        assert made["failed"] == 0, made["errors"]
    samples = front_metrics(lab)
    moved = {queue: value - before[queue] for queue, value in worker_packets(samples).items()}
    assert all(moved[str(cpu)] >= 10 * 4 for cpu in CPUS), moved  # SYN, ACK, data, FIN at least, per connection
    handled = sum(value for (name, _), value in samples.items() if name == "synproxy_front_packets_total")
    assert handled == sum(worker_packets(samples).values())
    assert len(set(workers(lab).values())) == 2
    second = lab.run(FRONT, [PYTHON, "-m", "synproxy.cli", "front", "--config", str(lab.config_path)], check=False)
    assert second.returncode != 0 and "another synproxy front runs" in second.stderr


def test_a_killed_worker_is_restarted_and_connections_keep_succeeding(lab):
    before = front_metrics(lab)
    killed = workers(lab)[1]
    os.kill(killed, signal.SIGKILL)
    exited = wait_for(lambda: [e for e in events(lab, "worker_exited") if e["pid"] == killed], 5,
                      "the front did not notice its worker's death")
    assert exited[0]["signal"] == "SIGKILL" and exited[0]["queue"] == 1
    restarted = wait_for(lambda: workers(lab)[1] != killed and workers(lab)[1], 5, "no worker restarted")
    assert os.path.exists(f"/proc/{restarted}")
    for cpu in CPUS:
        made = clients_on(lab, cpu, 10)
        assert made["failed"] == 0, made["errors"]
    after = front_metrics(lab)
    assert after[("synproxy_front_worker_restarts_total", ())] == before[("synproxy_front_worker_restarts_total", ())] + 1
    packets = worker_packets(after)
    assert all(packets[queue] > worker_packets(before)[queue] for queue in ("0", "1")), "counts kept and growing"


def test_sighup_reaches_every_worker(lab):
    """With backend1 removed from the configuration, no new connection may reach it through either worker."""
    backend1 = next(h.address for h in lab.by_role("backend") if h.name == "backend1")
    text = lab.config_path.read_text()
    lab.config_path.write_text(text.replace(f", {backend1}]", "]"))
    try:
        seen = len(events(lab, "worker_reloaded"))
        os.kill(lab.pid(FRONT), signal.SIGHUP)
        reloaded = wait_for(lambda: events(lab, "worker_reloaded")[seen:], 5, "no worker reloaded")
        wait_for(lambda: {e["queue"] for e in events(lab, "worker_reloaded")[seen:]} == {0, 1}, 5,
                 f"not every worker reloaded: {reloaded}")
        created = backend_stats(lab, "backend1")["created"]
        for cpu in CPUS:
            made = clients_on(lab, cpu, 10)
            assert made["failed"] == 0, made["errors"]
        assert backend_stats(lab, "backend1")["created"] == created
    finally:
        lab.config_path.write_text(text)
        os.kill(lab.pid(FRONT), signal.SIGHUP)


def test_a_killed_front_takes_its_workers_along(lab):
    pids = set(workers(lab).values())
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    lab.stop_process(FRONT, signal.SIGKILL)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 5, "workers outlived their front")
    assert pids_inside(lab.ns(FRONT)) == []


def test_a_front_in_nfqueue_mode_removes_a_killed_fronts_programs(lab):
    """Starts after the previous test killed the front: an XDP front is started and killed, its programs stay."""
    def attached() -> str:
        link = lab.run(FRONT, ["ip", "link", "show", "eth0"]).stdout
        tc = lab.run(FRONT, ["tc", "filter", "show", "dev", "eth0", "ingress"], check=False).stdout
        return ("xdp" if "prog/xdp" in link else "") + ("tc" if "synproxy_front" in tc else "")

    lab.start_front(FRONT, data_plane="xdp")
    lab.stop_process(FRONT, signal.SIGKILL)
    assert attached() == "xdptc"
    lab.start_front(FRONT)  # the lab's mode: nfqueue
    assert attached() == ""
    logged = {entry["event"] for entry in events(lab, "xdp_leftover_detached") + events(lab, "tc_leftover_detached")}
    assert logged == {"xdp_leftover_detached", "tc_leftover_detached"}
    made = clients_on(lab, 0, 5)
    assert made["failed"] == 0, made["errors"]
