"""`synproxy bench`: every contender on the same one-front lab, under the same floods and one upload.

The generator runs flat out on CPU 0, the router paces the flood (generator.pacer), and the
contender's work runs on CPU 1 (measure.py). Every flood step is preceded by an idle step of the same
contender with the same legitimate-client probe, and what the idle step used per second (both CPUs,
the contender's process, the queue's reads, backlog drops) is subtracted from the flood step: the
probe and the machine's background are charged to no contender. Repetitions rotate the order of the
contenders. The method and the latest results are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import NetNS

from benchmarks import connection_rate, fastopen
from benchmarks import contenders as contenders_module
from benchmarks.contenders import BACKEND, FRONT, PORT, QUEUE, Contender
from benchmarks.generator import FLOODS, PACER_TABLE, GeneratorError, pacer, trafgen_argv, trafgen_config
from benchmarks.measure import (
    CONTENDER_CPU,
    GENERATOR_CPU,
    BpfStats,
    OtherLoad,
    attached_programs,
    backlog_drops,
    busy_per_cpu,
    cpu_since,
    namespace_inodes,
    pin_process,
    process_cpu_seconds,
    process_tree,
    program_stats,
    receive_steered,
    steer_napi,
    steer_receive,
    veth_drops,
)
from benchmarks.options import FLOOD_RATES, FULL_RATES, QUICK_FLOOD_RATES, QUICK_RATES, SCENARIOS
from synproxy.front.service import queue_stats
from synproxy.lab.topology import FARM_INTERFACE, SPOOFED_SOURCES, VIP, Lab, LabError, default_hosts
from synproxy.netns import unique_name
from synproxy.tfo import DEFAULT_KEY_PERIOD_SECONDS

COUNTERS_TABLE = "synproxy_bench"
PROBE_INTERVAL = 0.02            # one real HTTP request every 20 ms, in the idle and the flood steps
# How long a probe request may take: a SYN and its retransmits at 1 and 3 s. Against a contender that
# serves no clients every request fails the same way; a shorter wait sends the same packets (SYN and
# one retransmit) and keeps the quick run short.
PROBE_TIMEOUT, PROBE_TIMEOUT_NO_SERVER = 3.0, 1.5
# The probe shares CPU 0 with trafgen, which spins there during every flood step: at the normal policy
# its requests waited for trafgen's time slice (p99 connect 8-10 ms under every flood for every
# contender that kept up, 1.9-8.9 ms idle, in one repetition). At SCHED_FIFO it runs when it can: when
# trafgen is back in user space, every 32 frames on this preempt=none kernel (generator.TX_RING_KIB).
PROBE_PRIORITY = 10
NOISY_IDLE = 0.3                 # an idle step that kept a CPU busier than this share had company: flagged
OTHER_LOAD = 0.1                 # other sessions' processes using more than this share of a CPU: flagged
# Each probe request gets a source port of its own, none reused within a run: a 4-tuple reused while
# the backend still holds its previous connection in TIME_WAIT fails through the proxy (the backend
# never sees the SYN that would recycle it; docs/backend.md), and the kernel's own choice here
# reused ports after ~20 s, which read as flood losses in the later steps.
PROBE_PORTS = range(20000, 60000)
PROFILE_FILE = "front-profile.txt"
PROFILED = "synproxy-front-nfqueue"  # --profile: the front whose Python handler answers the SYNs
SHORT_OF_NOMINAL = 0.9           # a step that delivered less than this share of the nominal rate is flagged
UPLOAD_BYTES, QUICK_UPLOAD_BYTES = 200_000_000, 50_000_000


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process we started and its children (trafgen sends from a forked worker)."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Bench:
    """The lab, its counters, and one measured window at a time."""

    def __init__(self, lab: Lab, seconds: float, idle_seconds: float, upload_bytes: int, work_dir: Path,
                 stats: BpfStats):
        self.lab = lab
        self.stats = stats
        self.seconds = seconds
        self.idle_seconds = idle_seconds
        self.upload_bytes = upload_bytes
        self.work_dir = work_dir
        self.next_probe_port = PROBE_PORTS.start
        with NetNS(lab.ns("router")) as ns:
            router_side = ns.get_links(ns.link_lookup(ifname="attacker")[0])[0].get_attr("IFLA_ADDRESS")
        self.trafgen_configs = {}
        for flood in FLOODS:
            self.trafgen_configs[flood] = work_dir / f"{flood}.trafgen"
            self.trafgen_configs[flood].write_text(trafgen_config(router_side, VIP, PORT, flood))
        # Replies to the spoofed range, counted where the router blackholes them; flood packets counted
        # where the backend first sees them (after the BPF program's decapsulation, for the front).
        self._counters("router", {"synacks": f"ip daddr {SPOOFED_SOURCES} tcp flags & (syn|ack) == syn|ack",
                                  "resets": f"ip daddr {SPOOFED_SOURCES} tcp flags & rst == rst"})
        self._counters(BACKEND, {"flood_syns": f"ip saddr {SPOOFED_SOURCES} tcp flags & (syn|ack) == syn",
                                 "flood_acks": f"ip saddr {SPOOFED_SOURCES} tcp flags & (syn|ack) == ack"})
        self.steered = ((FRONT, "eth0"), (BACKEND, "eth0"), *([(BACKEND, FARM_INTERFACE)] if lab.farm_link else []))
        for host, interface in self.steered:
            steer_receive(lab.ns(host), interface, CONTENDER_CPU)
        self.other_load = OtherLoad(namespace_inodes([lab.ns(host.name) for host in lab.hosts] + [lab.ns("router")]))

    def _counters(self, host: str, matches: dict[str, str]) -> None:
        counters = "".join(f" counter {name} {{}}\n" for name in matches)
        rules = "".join(f"  {match} counter name {name}\n" for name, match in matches.items())
        contenders_module.nft(self.lab, host, (
            f"table inet {COUNTERS_TABLE} {{\n{counters} chain prerouting {{\n"
            f"  type filter hook prerouting priority -400; policy accept;\n{rules} }}\n}}\n"))

    def counters(self, host: str) -> dict[str, int]:
        listing = json.loads(self.lab.run(host, ["nft", "-j", "list", "counters", "table", "inet",
                                                 COUNTERS_TABLE]).stdout)
        return {item["counter"]["name"]: item["counter"]["packets"] for item in listing["nftables"]
                if "counter" in item}

    def delivered(self) -> int:
        """Flood packets the router's pacer let through to the contender (generator.pacer)."""
        listing = json.loads(self.lab.run("router", ["nft", "-j", "list", "counter", "inet", PACER_TABLE,
                                                     "delivered"], check=False).stdout or '{"nftables": []}')
        return next((item["counter"]["packets"] for item in listing["nftables"] if "counter" in item), 0)

    def _wait_for_flood(self, generator: subprocess.Popen | None) -> None:
        """Until the generator's packets flow (its start, cpp on the config included, takes 0.1-0.3 s)."""
        if generator is None:
            return
        start, deadline = self.sent_packets(), time.monotonic() + 5
        while self.sent_packets() == start:
            if generator.poll() is not None or time.monotonic() > deadline:
                raise GeneratorError(f"trafgen sent nothing (exit status {generator.poll()})")
            time.sleep(0.01)
        time.sleep(0.2)  # past the first burst into empty queues

    def sent_packets(self) -> int:
        with NetNS(self.lab.ns("attacker")) as ns:
            link = ns.get_links(ns.link_lookup(ifname="eth0")[0])[0]
        return link.get_attr("IFLA_STATS64")["tx_packets"]

    def queue(self) -> dict[str, int]:
        text = self.lab.run(FRONT, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        return queue_stats(QUEUE, text) or {"length": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 0}

    def pin(self, contender: Contender) -> list[int]:
        """The contender's processes and the backend's (its data plane and servers) onto the contender CPU,
        and front0's receive poll when a native XDP program runs it (measure.steer_napi); returns the
        poll threads pinned."""
        for pid in (contender.pid(self.lab), self.lab.pid(BACKEND), self.lab.pid(f"{BACKEND}-servers"),
                    *process_tree(self.lab.pid(f"{BACKEND}-nginx"))):
            pin_process(pid, CONTENDER_CPU)
        return steer_napi(self.lab.ns(FRONT), "eth0", CONTENDER_CPU)

    def veth_drops(self) -> dict[str, dict[str, int]]:
        """Drop counters of both ends of front0's veth, where native XDP can lose frames."""
        return {f"router {FRONT}": veth_drops(self.lab.ns("router"), FRONT),
                f"{FRONT} eth0": veth_drops(self.lab.ns(FRONT), "eth0")}

    def programs(self) -> dict[int, str]:
        return {prog_id: f"{host} {where}" for host in (FRONT, BACKEND)
                for prog_id, where in attached_programs(self.lab.ns(host)).items()}

    def snapshot(self, contender: Contender, programs: dict[int, str]) -> dict:
        return {"time": time.monotonic(), "busy": busy_per_cpu(),
                "process": process_cpu_seconds(contender.pid(self.lab)), "generated": self.sent_packets(),
                "sent": self.delivered(), **self.counters("router"), **self.counters(BACKEND), "queue": self.queue(),
                "bpf": program_stats(set(programs)), "backlog_drops": backlog_drops(),
                "veth": self.veth_drops(), "others": self.other_load.totals()}

    def window(self, contender: Contender, flood: str | None, rate: int, seconds: float,
               profile: bool = False) -> dict:
        """``seconds`` of the probe alone (flood None) or of the probe and a flood at ``rate`` (0: unpaced),
        and what every counter moved meanwhile."""
        programs = self.programs()
        generator = None
        if flood is not None:
            contenders_module.nft(self.lab, "router", f"add table inet {PACER_TABLE}\ndelete table inet {PACER_TABLE}\n"
                                  + pacer(rate, "attacker"))
            generator = self.lab.popen("attacker", trafgen_argv(self.trafgen_configs[flood], "eth0", GENERATOR_CPU),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_for_flood(generator)
            probe = self.lab.popen("client", ["taskset", "-c", str(GENERATOR_CPU), "chrt", "-f", str(PROBE_PRIORITY),
                                              sys.executable, "-m",
                                              "benchmarks.probe", "--target", VIP, "--port", str(PORT),
                                              "--seconds", str(seconds), "--interval", str(PROBE_INTERVAL),
                                              "--timeout", str(PROBE_TIMEOUT if contender.serves_clients
                                                               else PROBE_TIMEOUT_NO_SERVER),
                                              "--source-port-from", str(self._probe_ports(seconds))],
                                   stdout=subprocess.PIPE, text=True)
            profiler = self._profile(contender, seconds) if profile else None
            self.other_load.also_ours = frozenset({profiler.pid} if profiler is not None else ())
            before = self.snapshot(contender, programs)
            time.sleep(seconds)  # a steady state: the flood (if any) runs before and after the window
            after = self.snapshot(contender, programs)
        finally:
            if generator is not None:
                stop_group(generator)
        flood_seconds = after["time"] - before["time"]
        self._drain()
        legit = json.loads(probe.communicate(timeout=seconds + PROBE_TIMEOUT + 30)[0])
        if profiler is not None:
            profiler.wait(timeout=60)
        process = (after["process"] - before["process"]
                   if after["process"] is not None and before["process"] is not None else None)
        return {
            "seconds": after["time"] - before["time"], "flood_seconds": flood_seconds,
            "busy": {cpu: after["busy"][cpu] - before["busy"][cpu] for cpu in after["busy"]},
            "process": process, "legit": legit, "others": cpu_since(before["others"], after["others"]),
            "queue_read": packets_read(before["queue"], after["queue"]),
            "queue_dropped": (after["queue"]["dropped"] + after["queue"]["user_dropped"]
                              - before["queue"]["dropped"] - before["queue"]["user_dropped"]),
            "bpf": bpf_moved(programs, before["bpf"], after["bpf"]),
            "veth_drops": counters_moved(before["veth"], after["veth"]),
            **{key: after[key] - before[key] for key in ("generated", "sent", "synacks", "resets", "flood_syns",
                                                         "flood_acks", "backlog_drops")},
        }

    def step(self, contender: Contender, flood: str, rate: int, repetition: int, profile: bool = False) -> dict:
        """An idle step, then the flood step; the flood step's figures net of the idle one's rates."""
        idle = self.window(contender, None, 0, self.idle_seconds)
        loaded = self.window(contender, flood, rate, self.seconds, profile)
        return figures(contender, flood, rate, repetition, idle, loaded)

    def upload(self, contender: Contender, repetition: int) -> dict:
        """One bulk upload to the VIP from the client (on the generator's CPU), no flood, no probe, timed with
        bpf_stats off (BpfStats); then, when BPF programs are attached, the same upload again with it on for
        the programs' own time per packet (every packet of it forwarded, for a front in the kernel).

        The client's receive work is steered to the generator's CPU too: the server's ACKs reach the
        client in the CPU context of the server that sent them (a veth delivers on the sending CPU), and
        the client's TCP sends its next segments from that ACK's processing (software segmentation and
        checksums, the router's forwarding). Left there, the client's sending ran on the contender's
        CPU, the more so the busier that CPU was (through a front: 0.3 % of CPU 0's samples in
        tcp_write_xmit, 6 % of CPU 1's; past the fronts: 20 % on CPU 0, 2 % on CPU 1; perf record -a,
        benchmarks/README.md), and a client on another machine costs the proxy nothing."""
        programs = self.programs()
        bpf: dict = {}
        with receive_steered(self.lab.ns("client"), "eth0", GENERATOR_CPU):
            with self.stats.paused() as stats_still_on:
                veth_before = self.veth_drops()
                before = busy_per_cpu()
                result = self._upload()
                busy = busy_per_cpu()
                veth = counters_moved(veth_before, self.veth_drops())
            if programs:
                bpf_before = program_stats(set(programs))
                self._upload()
                bpf = bpf_moved(programs, bpf_before, program_stats(set(programs)))
        contender_cpu = busy[CONTENDER_CPU] - before[CONTENDER_CPU]
        return {"scenario": "upload", "contender": contender.name, "repetition": repetition, **result,
                "contender_cpu_seconds": round(contender_cpu, 3), "bpf": per_run(bpf), "veth_drops": veth,
                **({"bpf_stats_on_while_timed": True} if stats_still_on else {}),
                "contender_cpu_us_per_mb": (round(1e6 * contender_cpu / (result["bytes"] / 1e6), 1)
                                            if result["bytes"] else None)}

    def _upload(self) -> dict:
        """benchmarks.upload from the client, pinned to the generator's CPU: what it printed."""
        done = self.lab.run("client", ["taskset", "-c", str(GENERATOR_CPU), sys.executable, "-m", "benchmarks.upload",
                                       "--target", VIP, "--port", str(PORT), "--bytes", str(self.upload_bytes),
                                       "--seconds", str(max(10.0, self.seconds))], timeout=120)
        return json.loads(done.stdout)

    def _probe_ports(self, seconds: float) -> int:
        """The first of the next window's probe source ports (one per request it can make)."""
        first = self.next_probe_port
        needed = int(seconds / PROBE_INTERVAL) + 1
        if first + needed > PROBE_PORTS.stop:
            first = PROBE_PORTS.start
        self.next_probe_port = first + needed
        return first

    def _drain(self) -> None:
        """Let the queue empty (the work it still holds belongs to this step), at most 3 s."""
        deadline = time.monotonic() + 3
        while self.queue()["length"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)

    def _profile(self, contender: Contender, seconds: float) -> subprocess.Popen | None:
        pid = contender.pid(self.lab)
        if pid is None:
            return None
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                 "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(self.work_dir / "profile.raw")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def figures(contender: Contender, flood: str, rate: int, repetition: int, idle: dict, loaded: dict) -> dict:
    """One flood step net of its idle step: every count and CPU time less the idle step's per-second
    rate times the flood step's length."""
    def net(value: float, idle_value: float) -> float:
        return value - idle_value / idle["seconds"] * loaded["seconds"]

    sent = loaded["sent"]
    sent_pps = sent / loaded["flood_seconds"]
    if contender.answers == "packets read":
        answered = round(net(loaded["queue_read"], idle["queue_read"]))
    elif contender.answers == "packets dropped":
        answered = sent
    else:
        answered = loaded["synacks"]
    def ours(window: dict, cpu: int) -> float:
        """A CPU's busy time less what other sessions' processes used on it (measure.OtherLoad)."""
        return window["busy"].get(cpu, 0.0) - window["others"].get(cpu, 0.0)

    cpu = {cpu: net(ours(loaded, cpu), ours(idle, cpu)) for cpu in loaded["busy"]}
    contender_cpu, generator_cpu = cpu[CONTENDER_CPU], cpu[GENERATOR_CPU]
    contender_cpu_raw = net(loaded["busy"][CONTENDER_CPU], idle["busy"].get(CONTENDER_CPU, 0.0))
    process = (net(loaded["process"], idle["process"] or 0.0) if loaded["process"] is not None else None)
    bpf = per_run(loaded["bpf"])

    def per(value: float | None, count: int) -> float | None:
        return round(1e6 * value / count, 2) if value is not None and count > 0 else None

    return {
        "scenario": flood, "contender": contender.name, "repetition": repetition, "offered_pps": rate,
        "seconds": round(loaded["flood_seconds"], 3), "idle_seconds": round(idle["seconds"], 3),
        "generated_pps": round(loaded["generated"] / loaded["flood_seconds"]),
        "sent": sent, "sent_pps": round(sent_pps),
        "sent_share": round(sent_pps / rate, 3) if rate else None,
        "short_of_nominal": bool(rate and sent_pps < SHORT_OF_NOMINAL * rate),
        "answered": answered, "answered_pps": round(answered / loaded["flood_seconds"]),
        "resets": loaded["resets"], "queue_dropped": loaded["queue_dropped"],
        "backlog_drops": round(net(loaded["backlog_drops"], idle["backlog_drops"])),
        "flood_syns_at_backend": loaded["flood_syns"], "flood_acks_at_backend": loaded["flood_acks"],
        "idle_cpu_per_second": {cpu: round(idle["busy"][cpu] / idle["seconds"], 3) for cpu in idle["busy"]},
        "other_processes_cpu_seconds": {cpu: round(used, 3) for cpu, used in loaded["others"].items()},
        "idle_other_processes_cpu_seconds": {cpu: round(used, 3) for cpu, used in idle["others"].items()},
        "noisy_idle": (any(busy / idle["seconds"] > NOISY_IDLE for busy in idle["busy"].values())
                       or sum(idle["others"].values()) > OTHER_LOAD * idle["seconds"]),
        "other_load": sum(loaded["others"].values()) > OTHER_LOAD * loaded["seconds"],
        "contender_cpu_seconds": round(contender_cpu, 3), "generator_cpu_seconds": round(generator_cpu, 3),
        "contender_cpu_seconds_with_others": round(contender_cpu_raw, 3),
        "cpu_us_per_answer": per(contender_cpu, answered) if contender.name != "sink" and flood == "syn" else None,
        "cpu_us_per_packet": per(contender_cpu, sent),
        "generator_cpu_us_per_packet": per(generator_cpu, sent),
        "process_us_per_answer": per(process, answered) if flood == "syn" else None,
        "process_us_per_packet": per(process, sent),
        "bpf": bpf, "veth_drops": loaded.get("veth_drops", {}), "idle_veth_drops": idle.get("veth_drops", {}),
        "legit": loaded["legit"], "idle_legit": idle["legit"],
    }


def bpf_moved(programs: dict[int, str], before: dict, after: dict) -> dict[str, list[int]]:
    """run_time_ns and run_cnt each attached program added between two readings, by place and name."""
    return {programs[prog_id]: [after[prog_id][i] - before[prog_id][i] for i in (0, 1)]
            for prog_id in programs if prog_id in after and prog_id in before}


def per_run(moved: dict[str, list[int]]) -> dict[str, dict]:
    return {where: {"runs": runs, "ns_per_run": round(run_ns / runs) if runs else None}
            for where, (run_ns, runs) in moved.items()}


def counters_moved(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per place, the counters that moved between two readings (veth drops: nothing moved, nothing shown)."""
    moved = {}
    for where, counters in after.items():
        changed = {name: value - before.get(where, {}).get(name, 0) for name, value in counters.items()
                   if value != before.get(where, {}).get(name, 0)}
        if changed:
            moved[where] = changed
    return moved


def packets_read(before: dict, after: dict) -> int:
    """Packets a queue's reader got between two readings of its stats. The kernel numbers a packet
    (id_sequence) only once it fits in the queue, so overflow drops ("dropped") were never numbered;
    numbered packets the socket could not take ("user_dropped") and those still queued were not read."""
    return (after["id_sequence"] - before["id_sequence"] - (after["user_dropped"] - before["user_dropped"])
            - (after["length"] - before["length"]))


def rotated(items: list, turn: int) -> list:
    """The order of the contenders in repetition ``turn``: each starts one place earlier than before."""
    shift = turn % len(items) if items else 0
    return items[shift:] + items[:shift]


def run(scenarios: tuple[str, ...], rates: dict[str, tuple[int, ...]], seconds: float, idle_seconds: float,
        repetitions: int, upload_bytes: int, chosen: list[type[Contender]], output: Path, profile: bool,
        quick: bool = False) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    # The lab as users run it (front.data_plane auto): clients send complete checksums, as from a wire,
    # and the router's side of front0 runs an XDP program (synproxy.lab.topology), for every contender.
    # Static routes: the contenders take the one front's place in turn, and its baseline is no front at all.
    # TFO (tfo.enabled: the fronts' keys, the backend's) only for the scenario that measures it. front0 reaches
    # backend0 over a farm link (what a front forwards does not come back through the router: benchmarks/README.md).
    lab = Lab(name=unique_name("bench"), hosts=default_hosts(fronts=1, backends=1), routing="static", farm_link=True,
              tfo_key_period_seconds=DEFAULT_KEY_PERIOD_SECONDS if "tfo" in scenarios else None)
    steps: list[dict] = []
    uploads: list[dict] = []
    running: dict[str, list[dict]] = {}
    connections: list[dict] = []
    fastopen_requests: list[dict] = []
    started = time.time()
    stats = BpfStats()
    contenders = [contender_class() for contender_class in chosen]
    bench = None
    try:
        lab.up()
        lab.stop_process(FRONT)  # the baseline: no front process (each contender starts its own)
        os.sched_setaffinity(0, {GENERATOR_CPU})  # the bench's own reading and writing stays off the contender's CPU
        bench = Bench(lab, seconds, idle_seconds, upload_bytes, lab.state_dir, stats)
        for repetition in range(repetitions):
            for contender in rotated(contenders, repetition):
                wanted = [scenario for scenario in scenarios if scenario in contender.scenarios]
                if not wanted:
                    continue
                print(f"bench: repetition {repetition + 1}/{repetitions}: {contender.name}", file=sys.stderr,
                      flush=True)
                contender.enter(lab)
                napi_threads = bench.pin(contender)
                reported = {**contender.running(lab), **({"napi_threads_pinned": len(napi_threads)}
                                                         if napi_threads else {})}
                if reported:
                    running.setdefault(contender.name, []).append(reported)
                try:
                    for scenario in wanted:
                        if scenario == "upload":
                            uploads.append(bench.upload(contender, repetition))
                            print(f"bench:   {json.dumps(uploads[-1])}", file=sys.stderr, flush=True)
                            continue
                        for rate in rates_for(contender, rates[scenario]):
                            profile_now = (profile and repetition == 0 and contender.name == PROFILED
                                           and scenario == "syn" and rate == rates[scenario][-1])
                            steps.append(bench.step(contender, scenario, rate, repetition, profile_now))
                            print(f"bench:   {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
                            if profile_now and (bench.work_dir / "profile.raw").exists():
                                (output / PROFILE_FILE).write_text(hot_functions(bench.work_dir / "profile.raw"))
                finally:
                    contender.leave(lab)
            if "connections" in scenarios:  # its own two routes (benchmarks/connection_rate.py)
                connections += connection_rate.measure(bench, repetition, idle_seconds, quick)
                print(f"bench:   connections: {json.dumps(connections[-1])}", file=sys.stderr, flush=True)
            if "tfo" in scenarios:  # the default front alone (benchmarks/fastopen.py)
                fastopen_requests += fastopen.measure(bench, repetition, quick)
                print(f"bench:   tfo: {json.dumps(fastopen.summarise(fastopen_requests)['rows'])}", file=sys.stderr,
                      flush=True)
    finally:
        stats.close()
        if bench is not None:
            bench.other_load.stop()
        lab.down()
    return {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                    "minutes": round((time.time() - started) / 60, 1)},
        "seconds_per_step": seconds, "idle_seconds_per_step": idle_seconds, "repetitions": repetitions,
        "generator_cpu": GENERATOR_CPU, "contender_cpu": CONTENDER_CPU, "scenarios": list(scenarios),
        "rates": {scenario: list(rates[scenario]) for scenario in scenarios if scenario in rates},
        "upload_bytes": upload_bytes,
        "contenders": {c.name: c.description for c in chosen}, "running": running, "steps": steps,
        "uploads": uploads, "connections": connections, "fastopen": fastopen_requests,
    }


def rates_for(contender: Contender, rates: tuple[int, ...]) -> tuple[int, ...]:
    """The rates a contender is measured at: all, or only the highest (0, unpaced, is the highest)."""
    if not contender.top_rate_only:
        return rates
    return (max(rates, key=lambda rate: rate or float("inf")),)


def hot_functions(raw_profile: Path, top: int = 30) -> str:
    """py-spy's collapsed stacks by function: share of samples inside it (inclusive) and in it alone."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
    if not total:
        return "no samples\n"
    rows = sorted(inclusive.items(), key=lambda item: -item[1])[:top]
    lines = [f"{total} samples; inclusive %, own %, function\n"]
    lines += [f"{100 * count / total:5.1f} {100 * own.get(name, 0) / total:5.1f}  {name}\n" for name, count in rows]
    return "".join(lines)


def main(args: argparse.Namespace) -> int:
    from benchmarks.report import write_report

    if os.geteuid() != 0:
        print("synproxy bench: needs root (network namespaces, NFQUEUE, BPF)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("synproxy bench: needs two CPUs (the generator's and the contender's)", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else (0.8 if args.quick else 10.0)
    if not 0.5 <= seconds <= 60:
        print("synproxy bench: --seconds must be between 0.5 and 60", file=sys.stderr)
        return 2
    repetitions = args.repetitions if args.repetitions is not None else (1 if args.quick else 3)
    if not 1 <= repetitions <= 20:
        print("synproxy bench: --repetitions must be between 1 and 20", file=sys.stderr)
        return 2
    by_name = {c.name: c for c in contenders_module.ALL}
    wanted = [name.strip() for name in args.contenders.split(",")] if args.contenders else list(by_name)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        print(f"synproxy bench: unknown contender {unknown[0]!r}; choose from {', '.join(by_name)}",
              file=sys.stderr)
        return 2
    scenarios = tuple(args.scenarios or SCENARIOS)
    chosen = [by_name["sink"]] + [by_name[name] for name in by_name if name in wanted and name != "sink"]
    flood_rates = args.rates or (QUICK_FLOOD_RATES if args.quick else FLOOD_RATES)
    rates = {"syn": args.rates or (QUICK_RATES if args.quick else FULL_RATES), "ack": flood_rates,
             "mixed": flood_rates}
    upload_bytes = QUICK_UPLOAD_BYTES if args.quick else UPLOAD_BYTES
    try:
        results = run(scenarios, rates, seconds, seconds / 2, repetitions, upload_bytes, chosen, args.output,
                      args.profile, quick=args.quick)
    except (GeneratorError, LabError, OSError) as error:
        print(f"synproxy bench: {error}", file=sys.stderr)
        return 1
    write_report(results, args.output)
    connection_rate.append_report(results, args.output)
    fastopen.append_report(results, args.output)
    print(f"synproxy bench: results in {args.output}/results.md ({results['machine']['minutes']} minutes)")
    return 0
