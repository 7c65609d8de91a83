"""What the backend's programs cost per packet under HTTP load through the proxy
(`flock /tmp/synproxy-lab.lock python3 -m benchmarks.backend_load_cost`, root; run it from each checkout to
compare).

The bench's lab and layout (benchmarks/connection_rate.py: one front with the default data plane, nginx on
backend0, ab and the backend on the contender CPU, receive work steered there by RPS), then ab at
concurrency 32 with keep-alive and with a new connection per request, for --seconds each, --repetitions
times. For each run: the backend's XDP stage and tc program, bpf_stats' run_time_ns / run_cnt (ns per
run) and runs per request, and ab's requests/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from benchmarks.connection_rate import DefaultFront, run_ab
from benchmarks.contenders import BACKEND, FRONT
from benchmarks.measure import (
    CONTENDER_CPU,
    GENERATOR_CPU,
    attached_programs,
    enable_bpf_stats,
    pin_process,
    process_tree,
    program_stats,
    steer_receive,
)
from synproxy.lab.topology import Lab, default_hosts
from synproxy.netns import unique_name

CONCURRENCY = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    lab = Lab(name=unique_name("bload"), hosts=default_hosts(fronts=1, backends=1), routing="static")
    stats = enable_bpf_stats()
    results: dict[tuple[str, str], list[float]] = {}
    try:
        lab.up()
        os.sched_setaffinity(0, {GENERATOR_CPU})
        lab.stop_process(FRONT)
        DefaultFront().enter(lab)
        for host in (FRONT, BACKEND):
            steer_receive(lab.ns(host), "eth0", CONTENDER_CPU)
        for pid in (lab.pid(FRONT), lab.pid(BACKEND), *process_tree(lab.pid(f"{BACKEND}-nginx"))):
            pin_process(pid, CONTENDER_CPU)
        programs = {prog_id: where.split()[-1] for prog_id, where in attached_programs(lab.ns(BACKEND)).items()}
        for _ in range(args.repetitions):
            for mode in ("keep-alive", "new"):
                before = program_stats(set(programs))
                figures = run_ab(lab, CONCURRENCY, args.seconds, mode == "keep-alive", Path(lab.state_dir))
                after = program_stats(set(programs))
                results.setdefault((mode, "requests/s"), []).append(figures["requests_per_second"])
                for prog_id, name in programs.items():
                    time_ns, runs = (after[prog_id][i] - before[prog_id][i] for i in (0, 1))
                    results.setdefault((mode, f"{name} ns/run"), []).append(time_ns / runs if runs else 0)
                    results.setdefault((mode, f"{name} runs/request"), []).append(
                        runs / figures["requests"] if figures["requests"] else 0)
                print(f"{mode}: {figures['requests_per_second']:.0f} requests/s, errors {figures['errors']}",
                      file=sys.stderr, flush=True)
    finally:
        os.close(stats)
        lab.down()
    print(f"ab -c {CONCURRENCY}, {args.seconds:g} s x {args.repetitions}: median (min-max)")
    for (mode, figure), values in results.items():
        print(f"  {mode:10} {figure:36} {statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
