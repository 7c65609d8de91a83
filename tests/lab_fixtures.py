"""Shared pieces for tests that run the namespace lab (root and a BPF-capable kernel needed)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from synproxy.lab.topology import Lab

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, BPF)")


def backend_stats(lab: Lab, host: str) -> dict:
    result = lab.run(host, [sys.executable, "-m", "synproxy.cli", "backend", "--config", str(lab.config_path),
                            "--stats", "--json"])
    return json.loads(result.stdout)


def total_created(lab: Lab) -> int:
    return sum(backend_stats(lab, h.name)["created"] for h in lab.by_role("backend"))
