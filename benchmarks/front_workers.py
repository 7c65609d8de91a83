"""`python3 -m benchmarks.front_workers`: packets per second one NFQUEUE front handles with 1 and 2 workers.

The lab cut to one front (front.data_plane: nfqueue) and one backend. RPS on the front's interface
spreads its receive work over both CPUs by flow hash, as a NIC's receive queues would (a veth has one),
so --queue-cpu-fanout gives each worker a share. trafgen floods from the attacker flat out on CPU 0
(generator.py), the router passing at most --rate packets/s (generator.pacer; 0: all). The figure:
the front's packets handled per second (every outcome of synproxy_front_packets_total) over a window
of --seconds once the flood runs, per worker count, the counts interleaved over --repetitions; also
the share per queue, what the kernel dropped at full queues, each CPU's busy share and the CPU time of
the front's processes (parent and workers) per second. Needs root and trafgen.

On this 2-core VM the generator and the router's forwarding take CPU 0 too: the workers compete with
them, so the figure is what one front answers beside its own load, not a per-core capacity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from pyroute2 import NetNS

from benchmarks.contenders import nft
from benchmarks.generator import FLOODS, PACER_TABLE, pacer, trafgen_argv, trafgen_config
from benchmarks.harness import stop_group
from benchmarks.measure import busy_per_cpu, process_cpu_seconds
from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, default_hosts, scrape
from synproxy.netns import pids_inside, unique_name

FRONT = "front0"
GENERATOR_CPU = 0
ALL_CPUS = "3"  # rps_cpus mask: CPUs 0 and 1


def handled(lab: Lab) -> tuple[float, dict[str, float], float]:
    """The front's packets handled, per queue, and the kernel's drops at its full queues, now."""
    front = lab.by_role("front")[0]
    samples = scrape(lab, FRONT, front.address, FRONT_METRICS_PORT)
    queues = {dict(labels)["queue"]: value for (name, labels), value in samples.items()
              if name == "synproxy_front_worker_packets_total"}
    dropped = sum(value for (name, _), value in samples.items()
                  if name in ("synproxy_front_queue_dropped_total", "synproxy_front_queue_user_dropped_total"))
    return sum(queues.values()), queues, dropped


def run(workers: int, flood: str, rate: int, seconds: float) -> dict:
    lab = Lab(name=unique_name("spwb"), hosts=default_hosts(fronts=1, backends=1), data_plane="nfqueue",
              workers=workers)
    lab.up()
    generator = None
    try:
        lab.run(FRONT, ["sh", "-c", f"echo {ALL_CPUS} > /sys/class/net/eth0/queues/rx-0/rps_cpus"])
        with NetNS(lab.ns("router")) as ns:
            router_side = ns.get_links(ns.link_lookup(ifname="attacker")[0])[0].get_attr("IFLA_ADDRESS")
        config = lab.state_dir / f"{flood}.trafgen"
        config.write_text(trafgen_config(router_side, VIP, 80, flood))
        nft(lab, "router", pacer(rate, "attacker"))
        generator = lab.popen("attacker", trafgen_argv(config, "eth0", GENERATOR_CPU), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        start, deadline = handled(lab)[0], time.monotonic() + 10
        while handled(lab)[0] == start:
            if generator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the front handled nothing of the flood (trafgen status {generator.poll()})")
            time.sleep(0.1)
        time.sleep(1)  # past the first burst into empty queues
        processes = pids_inside(lab.ns(FRONT))
        cpu_before, busy_before = sum(process_cpu_seconds(pid) or 0 for pid in processes), busy_per_cpu()
        before, queues_before, dropped_before, started = *handled(lab), time.monotonic()
        time.sleep(seconds)
        after, queues_after, dropped_after, ended = *handled(lab), time.monotonic()
        cpu_after, busy_after = sum(process_cpu_seconds(pid) or 0 for pid in processes), busy_per_cpu()
    finally:
        if generator is not None:
            stop_group(generator)
        lab.run("router", ["nft", "delete", "table", "inet", PACER_TABLE], check=False)
        lab.down()
    elapsed = ended - started
    return {"workers": workers, "handled_pps": round((after - before) / elapsed),
            "per_queue_pps": {queue: round((queues_after[queue] - queues_before.get(queue, 0)) / elapsed)
                              for queue in queues_after},
            "queue_dropped_pps": round((dropped_after - dropped_before) / elapsed),
            "front_processes_cpu": round((cpu_after - cpu_before) / elapsed, 2),
            "cpu_busy": {cpu: round((busy_after[cpu] - busy_before[cpu]) / elapsed, 2) for cpu in busy_after}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--flood", choices=FLOODS, default="syn")
    parser.add_argument("--rate", type=int, default=0, help="packets/s the router passes (0: all)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    counts = [int(count) for count in args.workers.split(",")]
    if not 1 <= args.repetitions <= 10 or not 1 <= args.seconds <= 60 or not all(1 <= c <= 8 for c in counts):
        parser.error("--repetitions 1-10, --seconds 1-60, worker counts 1-8")
    runs: dict[int, list[dict]] = {count: [] for count in counts}
    for repetition in range(args.repetitions):
        for count in counts[repetition % len(counts):] + counts[:repetition % len(counts)]:  # interleaved, rotated
            result = run(count, args.flood, args.rate, args.seconds)
            runs[count].append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    summary = {}
    for count, results in runs.items():
        rates = [result["handled_pps"] for result in results]
        summary[count] = {"median_pps": statistics.median(rates), "min_pps": min(rates), "max_pps": max(rates),
                          "runs": results}
    print(json.dumps({"flood": args.flood, "rate": args.rate, "seconds": args.seconds, "workers": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
