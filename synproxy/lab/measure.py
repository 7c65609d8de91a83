"""`python3 -m synproxy.lab.measure --data-plane MODE`: the demo's flood against one data plane, with the
kernel counting every BPF program's run time, and one JSON line: how long the flood took, how the clients
fared, each front's data plane, and the front programs' nanoseconds per run (read before the lab goes).

The figures in docs/front.md ("The data plane, measured") come from it. Needs root and bpftool.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from synproxy.bpf.libbpf import enable_run_time_stats
from synproxy.config import DATA_PLANES
from synproxy.lab.demo import front_summary
from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, scrape

PROGRAMS = ("synproxy_front", "synproxy_front_xdp", "xdp_pass")


def run_times() -> dict[int, tuple[str, int, int]]:
    """Every loaded program of ours: id -> (name, run_time_ns, run_cnt); bpftool shows the full name."""
    shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    return {p["id"]: (p["name"], p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in shown
            if p.get("name") in PROGRAMS}


def measure(data_plane: str, flood_count: int, flood_seconds: float, clients: int) -> dict:
    lab = Lab(name="measure", data_plane=data_plane)
    stats = enable_run_time_stats()
    try:
        lab.up()
        try:
            planes = {h.name: lab.data_plane_of(h) for h in lab.by_role("front")}
            before = run_times()
            flood = lab.popen("attacker", [sys.executable, "-m", "synproxy.lab.flood", "--target", VIP, "--count",
                                           str(flood_count), "--seconds", str(flood_seconds)],
                              stdout=subprocess.PIPE, text=True)
            connected = json.loads(lab.run("client", [sys.executable, "-m", "synproxy.lab.clients", "--target", VIP,
                                                      "--count", str(clients)], timeout=300).stdout)
            flooded = json.loads(flood.communicate(timeout=flood_seconds + 60)[0])
            programs: dict[str, list[int]] = {}
            for prog_id, (name, run_time, runs) in run_times().items():
                _, run_time_before, runs_before = before.get(prog_id, (name, 0, 0))
                total = programs.setdefault(name, [0, 0])
                total[0] += run_time - run_time_before
                total[1] += runs - runs_before
            fronts = {h.name: front_summary(scrape(lab, h.name, h.address, FRONT_METRICS_PORT))
                      for h in lab.by_role("front")}
        finally:
            lab.down()
    finally:
        os.close(stats)
    return {"data_plane": data_plane, "planes": planes, "flood": flooded,
            "clients": {key: connected[key] for key in ("attempted", "completed", "failed", "connect_p50_ms",
                                                        "connect_p99_ms")},
            "programs": {name: {"runs": runs, "ns_per_run": round(run_time / runs) if runs else None}
                         for name, (run_time, runs) in programs.items()},
            "fronts": fronts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-plane", choices=DATA_PLANES, default="auto")
    parser.add_argument("--flood-count", type=int, default=300_000)
    parser.add_argument("--flood-seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=25)
    args = parser.parse_args()
    print(json.dumps(measure(args.data_plane, args.flood_count, args.flood_seconds, args.clients)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
