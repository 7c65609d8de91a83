"""A reload (SIGHUP) with a wrong configuration or secret keeps the node serving with what it had, logs a
structured error and counts it; the next good reload applies; the secret is never in the log."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from synproxy.lab.topology import REPO_ROOT
from synproxy.netns import inside
from tests.test_health import METRICS, SECRET, config, namespace, running, wait_for  # noqa: F401 - namespace is a fixture


def samples(netns: str) -> list[Sample]:
    with inside(netns):
        text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape(netns: str) -> dict[str, float]:
    """The unlabelled series' values."""
    return {sample.name: sample.value for sample in samples(netns) if not sample.labels}


class NodeLog:
    """A node's stderr, read from its descriptor: ``select`` on the buffered text stream missed lines that an
    earlier ``readline`` had already pulled into the stream's buffer (a reload logged before the test first
    looked stayed there unseen, and the test failed after waiting)."""

    def __init__(self, process):
        self.fd, self.pending, self.text = process.stderr.fileno(), b"", ""
        self.entries: list[dict] = []

    def line(self, deadline: float) -> str | None:
        """The next whole line, or None at the deadline or the end of the stream."""
        while b"\n" not in self.pending:
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        self.text += line.decode() + "\n"
        return line.decode()

    def until(self, events: tuple[str, ...], seconds: float = 10) -> dict:
        """The log up to the next of ``events``, which is returned."""
        deadline = time.monotonic() + seconds
        while (line := self.line(deadline)) is not None:
            if line.startswith("{"):
                self.entries.append(json.loads(line))
                if self.entries[-1]["event"] in events:
                    return self.entries[-1]
        raise AssertionError(f"none of {events} logged in {seconds} s")

    def rest(self) -> str:
        """Everything the node wrote, once it has exited."""
        while self.line(time.monotonic() + 5) is not None:
            pass
        return self.text + self.pending.decode()


def reload(process, log: NodeLog) -> dict:
    """SIGHUP, then the node's log up to the reload's outcome, which is returned."""
    process.send_signal(signal.SIGHUP)
    return log.until(("config_reload_failed", "config_reloaded", "restart_required"))


@pytest.mark.parametrize("role", ["front", "backend"])
def test_a_refused_reload_keeps_the_node_serving_logs_and_counts_it(namespace, tmp_path, role):  # noqa: F811
    """Before: a refused reload was only a log line; no metric said a node runs an older configuration than
    its file."""
    path = Path(config(tmp_path, "nfqueue"))
    good = path.read_text()
    failures = f"synproxy_{role}_config_reload_failures_total"
    with running(namespace, role, "--config", str(path)) as process:
        log = NodeLog(process)
        wait_for(namespace, "/readyz", 200, seconds=30)
        assert scrape(namespace)[failures] == 0
        documented = set(re.findall(r"`([a-z_]+)`", (REPO_ROOT / "docs" / "metrics.md").read_text()))
        served = {re.sub(r"_(bucket|count|sum)$", "", name) for name in {sample.name for sample in samples(namespace)}
                  if name.startswith("synproxy_")}  # process_*: prometheus_client's, named by its docs
        assert served - documented == set()  # a Counter's _created series included: docs/metrics.md has none
        path.write_text(good + "salt_period_seconds: .inf\n")
        refused = reload(process, log)
        assert (refused["event"], refused["level"]) == ("config_reload_failed", "error")
        assert "salt_period_seconds: expected a finite number" in refused["error"]
        assert scrape(namespace)[failures] == 1 and wait_for(namespace, "/readyz", 200)["ready"]
        path.write_text(good)
        (tmp_path / "secret.hex").chmod(0o644)
        refused = reload(process, log)
        assert refused["event"] == "config_reload_failed" and "secret_file" in refused["error"]
        assert scrape(namespace)[failures] == 2 and wait_for(namespace, "/readyz", 200)["ready"]
        (tmp_path / "secret.hex").chmod(0o600)
        assert reload(process, log)["event"] == "config_reloaded"
        assert scrape(namespace)[failures] == 2 and process.poll() is None
    assert SECRET.hex() not in log.rest()


def test_a_reload_a_worker_refuses_is_counted(namespace, tmp_path):  # noqa: F811
    """With front.workers above 1 the front reloads, then forwards SIGHUP to its workers, and each reads the
    files again: they can change in between (here while the workers are stopped). A worker then keeps its
    older configuration. Before: only its log said so; the counter, which the front's process serves, did not."""
    path = Path(config(tmp_path, "nfqueue"))
    good = path.read_text().replace("front:\n", "front:\n  workers: 2\n")
    path.write_text(good)
    with running(namespace, "front", "--config", str(path)) as process:
        log = NodeLog(process)
        workers = [log.until(("worker_started",))["pid"] for _ in range(2)]
        wait_for(namespace, "/readyz", 200, seconds=30)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert reload(process, log)["event"] == "config_reloaded"
            path.write_text(good + "salt_period_seconds: .inf\n")
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        refused = [log.until(("config_reload_failed",), seconds=30) for _ in workers]
        assert {entry["queue"] for entry in refused} == {0, 1}
        deadline = time.monotonic() + 15
        while scrape(namespace)["synproxy_front_config_reload_failures_total"] != 2:
            assert time.monotonic() < deadline, "the workers' refusals were not counted"
            time.sleep(0.1)
        assert process.poll() is None
