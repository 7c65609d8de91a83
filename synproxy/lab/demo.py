"""`synproxy lab demo`: the lab under a spoofed SYN flood while real clients connect, then a report."""

from __future__ import annotations

import json
import subprocess
import sys

from synproxy.lab.topology import FRONT_METRICS_PORT, VIP, Lab, scrape

CROSS_NODE_PORTS = (50000, 50999)


def front_summary(samples: dict) -> dict[str, float]:
    """A front's packet outcomes folded into what the report shows: answered, validated and forwarded (by
    the queue or the kernel's programs), dropped by the front, and dropped by the kernel at its full queue.
    What a program passes on, the queue counts."""
    summary = {"syn_answered": 0.0, "validated": 0.0, "forwarded": 0.0, "dropped": 0.0, "queue_dropped": 0.0}
    for (name, labels), value in samples.items():
        if name in ("synproxy_front_queue_dropped_total", "synproxy_front_queue_user_dropped_total"):
            summary["queue_dropped"] += value
        labels = dict(labels)
        outcome = labels.get("outcome", "")
        if name == "synproxy_front_kernel_packets_total":
            if outcome in ("syn_answered", "validated"):
                summary[outcome] += value
            elif outcome.startswith("forwarded"):
                summary["forwarded"] += value
            elif outcome == "unsent" and labels["path"] == "tc":  # the tc program drops it; XDP passes it on
                summary["dropped"] += value
        if name != "synproxy_front_packets_total":
            continue
        key = outcome if outcome in summary else "forwarded" if outcome.startswith("forwarded") else "dropped"
        summary[key] += value
    return summary


def run_demo(lab: Lab, clients: int = 25, flood_count: int = 300_000, flood_seconds: float = 15) -> int:
    python = sys.executable
    print(f"== bringing up lab {lab.name!r}: client, attacker, router (ECMP), "
          f"{len(lab.by_role('front'))} fronts, {len(lab.by_role('backend'))} backends")
    lab.up()
    try:
        lab.steer_handshakes(CROSS_NODE_PORTS, syn_front="front0", ack_front="front2")
        flood = lab.popen("attacker", [python, "-m", "synproxy.lab.flood", "--target", VIP,
                                       "--count", str(flood_count), "--seconds", str(flood_seconds)],
                          stdout=subprocess.PIPE, text=True)
        print(f"== attacker floods spoofed SYNs (at most {flood_count} in {flood_seconds:.0f} s); "
              f"clients connect meanwhile")
        ordinary = json.loads(lab.run("client", [python, "-m", "synproxy.lab.clients", "--target", VIP,
                                                 "--count", str(clients)], timeout=300).stdout)
        crossed = json.loads(lab.run("client", [python, "-m", "synproxy.lab.clients", "--target", VIP,
                                                "--count", "5", "--source-port-from",
                                                str(CROSS_NODE_PORTS[0])], timeout=120).stdout)
        curls = [lab.run("client", ["curl", "-sS", "-m", "5", f"http://{VIP}/"], check=False)
                 for _ in range(5)]
        flooded = json.loads(flood.communicate(timeout=flood_seconds + 60)[0])
        report(lab, ordinary, crossed, curls, flooded)
        ok = ordinary["failed"] == 0 and crossed["failed"] == 0 and all(c.returncode == 0 for c in curls)
        return 0 if ok else 1
    finally:
        print(f"== tearing down lab {lab.name!r}")
        lab.down()


def report(lab: Lab, ordinary: dict, crossed: dict, curls: list, flooded: dict) -> None:
    print("\n== report")
    print(f"flood: {flooded['sent']} spoofed SYNs in {flooded['seconds']} s ({flooded['rate_pps']}/s)")
    print(f"python clients: {ordinary['completed']}/{ordinary['attempted']} connections completed "
          f"(HTTP + echo), backends {ordinary['backends']}, connect p50 {ordinary['connect_p50_ms']} ms, "
          f"p99 {ordinary['connect_p99_ms']} ms")
    print(f"curl: {sum(c.returncode == 0 for c in curls)}/{len(curls)} requests answered")
    print(f"cross-node handshakes (SYN to front0, ACK to front2): "
          f"{crossed['completed']}/{crossed['attempted']} completed")
    print(f"{'front':8} {'data plane':>18} {'SYN-ACKs sent':>14} {'ACKs validated':>15} {'forwarded':>10} "
          f"{'dropped':>8} {'queue drops':>12}")
    for host in lab.by_role("front"):
        summary = front_summary(scrape(lab, host.name, host.address, FRONT_METRICS_PORT))
        plane = lab.data_plane_of(host)
        shown = f"{plane['mode']} ({', '.join(sorted(set(plane['xdp'].values())))})" if plane.get("xdp") else plane.get("mode")
        print(f"{host.name:8} {shown!s:>18} {summary['syn_answered']:14.0f} {summary['validated']:15.0f} "
              f"{summary['forwarded']:10.0f} {summary['dropped']:8.0f} {summary['queue_dropped']:12.0f}")
    if lab.routing == "bgp":
        routed = [name for name, state in lab.announcements().items() if state["routed"]]
        print(f"router: the VIPs learned by BGP, ECMP over {', '.join(routed) or 'no front'}")
    print(f"{'backend':8} {'connections created':>20} {'SYNs received':>14}")
    for host in lab.by_role("backend"):
        stats = json.loads(lab.run(host.name, [sys.executable, "-m", "synproxy.cli", "backend", "--config",
                                               str(lab.config_path), "--stats", "--json"]).stdout)
        print(f"{host.name:8} {stats.get('created', 0):20} {stats.get('syn_received', 0):14}")
