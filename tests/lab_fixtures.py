"""Shared pieces for tests that run the namespace lab (root and a BPF-capable kernel needed)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

import pytest

from synproxy.lab.topology import VIP, Lab
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
