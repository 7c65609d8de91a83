"""Shared pieces for tests that run the namespace lab (root and a BPF-capable kernel needed)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, scrape
from synproxy.netns import unique_name

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, BPF)")


@contextlib.contextmanager
def running_lab(prefix: str, **settings) -> Iterator[Lab]:
    """A lab with a unique name, always removed afterwards (also when bringing it up failed)."""
    lab = Lab(name=unique_name(prefix), **settings)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def clients(lab: Lab, count: int, *extra: str) -> dict:
    """Run the lab's client tool in the client namespace; its JSON summary."""
    return json.loads(lab.run("client", [sys.executable, "-m", "synproxy.lab.clients", "--target", VIP,
                                         "--count", str(count), *extra], timeout=300).stdout)


def backend_stats(lab: Lab, host: str) -> dict:
    result = lab.run(host, [sys.executable, "-m", "synproxy.cli", "backend", "--config", str(lab.config_path),
                            "--stats", "--json"])
    return json.loads(result.stdout)


def total_created(lab: Lab) -> int:
    return sum(backend_stats(lab, h.name)["created"] for h in lab.by_role("backend"))


def outcomes(lab: Lab) -> Counter:
    """Every front's counts: (path, outcome, family) -> packets; path is "queue" (the Python handler) or
    the BPF program's ("tc", "xdp")."""
    totals = Counter()
    for host in lab.by_role("front"):
        for (name, labels), value in scrape(lab, host.name, host.address, FRONT_METRICS_PORT).items():
            labels = dict(labels)
            if name == "synproxy_front_packets_total":
                totals["queue", labels["outcome"], labels["family"]] += value
            elif name == "synproxy_front_kernel_packets_total":
                totals[labels["path"], labels["outcome"], labels["family"]] += value
    return totals


def summed(counts: Counter, outcome: str, family: str = "ipv4") -> float:
    """An outcome over every path (the queue and both programs)."""
    return sum(counts[path, outcome, family] for path in ("queue", "tc", "xdp"))


def data_plane(lab: Lab) -> str:
    """The mode the lab's fronts run (front0's; they share one configuration)."""
    return lab.data_plane_of(lab.by_role("front")[0])["mode"]
