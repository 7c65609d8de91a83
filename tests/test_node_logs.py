"""A node's log stays one JSON object per line even when libbpf has something to say, and a condition its
loop meets at every beat is logged once, not at every beat."""

from __future__ import annotations

import json
import subprocess
import time

from synproxy.logs import log
from tests.test_health import config, namespace, running, wait_for  # noqa: F401 - namespace is a fixture


def test_libbpf_messages_are_log_events_not_repeated_at_every_beat(namespace, tmp_path):  # noqa: F811
    """Before: with its clsact qdisc removed, a backend's log got the raw line "libbpf: Kernel error message:
    Parent Qdisc doesn't exists" at every beat (13 lines in 2 s)."""
    with running(namespace, "backend", "--config", config(tmp_path, "nfqueue")) as process:
        wait_for(namespace, "/readyz", 200, seconds=30)
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", "lo", "clsact"], check=True)
        wait_for(namespace, "/readyz", 503)
        time.sleep(1)  # four more beats
    log = [json.loads(line) for line in process.stderr.read().splitlines()]  # every line is JSON
    said = [entry for entry in log if entry["event"] == "libbpf_warning" and "Parent Qdisc" in entry["message"]]
    assert len(said) == 1 and said[0]["level"] == "warning", said


def test_a_record_is_one_write_so_workers_sharing_stderr_cannot_interleave(monkeypatch):
    """Before: print() wrote the record and its newline separately, and two front workers' lines came out as
    '{...}{...}' then an empty line (seen in test_startup_errors' two-worker start)."""
    writes = []

    class Stream:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Stream())
    log("worker_started", queue=7)
    assert len(writes) == 1 and writes[0].endswith("\n") and json.loads(writes[0])["queue"] == 7
