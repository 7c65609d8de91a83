"""A front with several workers (front.workers, docs/front.md) in the lab, NFQUEUE mode, one front.

Clients pinned to each CPU make the front's receive path run on that CPU, so --queue-cpu-fanout puts
their packets in that CPU's queue: both workers must answer, the metrics must add them up, a worker
killed with SIGKILL must come back (the front not ready, and so not announcing the VIPs by BGP, until it
has), a stopped worker must make the front not ready too, SIGHUP must reach each worker, SIGTERM must
withdraw the VIPs while the workers answer through the stop wait, and killing the front must take its
workers along. Last, a front started in NFQUEUE mode must remove the XDP and tc programs a killed
front left on its interface.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest

from synproxy.front.service import WORKER_SILENT_SECONDS, fetch
from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, default_hosts, scrape
from synproxy.netns import inside, pids_inside
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


def readiness(lab: Lab) -> tuple[int, dict]:
    """The front's /readyz: its status and its checks."""
    with inside(lab.ns("client")):
        status, body = fetch(f"http://{lab.by_role('front')[0].address}:{FRONT_METRICS_PORT}/readyz")
    return status, json.loads(body)["checks"]


def announced(lab: Lab) -> bool:
    """Ready, and the VIPs announced to the router (front.bgp: the lab's default routing)."""
    samples = front_metrics(lab)
    flags = [value for (name, _), value in samples.items() if name == "synproxy_front_bgp_announced"]
    return readiness(lab)[0] == 200 and bool(flags) and all(flags)


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
    """The front is not ready (its queue 1 unread) from the worker's death until its restart."""
    wait_for(lambda: announced(lab), 10, "the front is not ready and announced to begin with")
    before = front_metrics(lab)
    killed = workers(lab)[1]
    os.kill(killed, signal.SIGKILL)
    checks = wait_for(lambda: (found := readiness(lab))[0] == 503 and found[1], 5,
                      "the front stayed ready without its worker")
    assert "NFQUEUE 1" in checks["data_plane"] and checks["loop"] == "ok", checks
    exited = wait_for(lambda: [e for e in events(lab, "worker_exited") if e["pid"] == killed], 5,
                      "the front did not notice its worker's death")
    assert exited[0]["signal"] == "SIGKILL" and exited[0]["queue"] == 1
    restarted = wait_for(lambda: workers(lab)[1] != killed and workers(lab)[1], 5, "no worker restarted")
    assert os.path.exists(f"/proc/{restarted}")
    wait_for(lambda: announced(lab), 10, "the front is not ready and announced again after the restart")
    for cpu in CPUS:
        made = clients_on(lab, cpu, 10)
        assert made["failed"] == 0, made["errors"]
    after = front_metrics(lab)
    assert after[("synproxy_front_worker_restarts_total", ())] == before[("synproxy_front_worker_restarts_total", ())] + 1
    packets = worker_packets(after)
    assert all(packets[queue] > worker_packets(before)[queue] for queue in ("0", "1")), "counts kept and growing"


def test_a_stopped_worker_makes_the_front_not_ready(lab):
    stopped = workers(lab)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        checks = wait_for(lambda: (found := readiness(lab))[0] == 503 and found[1],
                          WORKER_SILENT_SECONDS + 5, "the front stayed ready with a stopped worker")
        assert time.monotonic() - started >= WORKER_SILENT_SECONDS - 0.5
        assert f"pid {stopped}" in checks["data_plane"] and "has not reported" in checks["data_plane"], checks
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: readiness(lab)[0] == 200, 5, "the front is not ready again once its worker runs")
    assert workers(lab)[0] == stopped, "a stopped worker is waited for, not replaced"
    wait_for(lambda: announced(lab), 10, "the VIPs are not announced again")


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


def test_sigterm_withdraws_and_keeps_the_workers_through_the_stop_wait(lab):
    """The parent withdraws at once, its workers run for front.bgp.stop_wait_seconds (the lab's: 1 s), then
    everything stops."""
    wait_for(lambda: announced(lab), 10, "the front is not ready and announced to begin with")
    pids = set(workers(lab).values())
    seen = len(events(lab, "front_stopping"))
    stopper = threading.Thread(target=lab.stop_process, args=(FRONT,))
    stopper.start()
    try:
        stopping = wait_for(lambda: events(lab, "front_stopping")[seen:], 5, "no front_stopping")
        assert stopping[0]["withdraw_wait_seconds"] == 1
        lab.wait_for_route(FRONT, announced=False, seconds=1)
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids), "a worker stopped before the stop wait ended"
    finally:
        stopper.join(15)
    assert not stopper.is_alive() and pids_inside(lab.ns(FRONT)) == []
    lab.start_front(FRONT)  # waits for its announcement
    assert set(workers(lab).values()).isdisjoint(pids)


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
