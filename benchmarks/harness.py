"""`synproxy bench`: every contender on the same one-front lab, under the same stepped SYN floods.

Per contender and offered rate it records what was sent, what was answered, the machine's CPU time
(/proc/stat) and the contender process's own (/proc/PID/stat), the kernel's queue drops, flood SYNs
that reached the backend, and what a steady stream of real HTTP clients saw meanwhile. The method
and the latest results are in benchmarks/README.md.
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

from benchmarks import contenders as contenders_module
from benchmarks.contenders import BACKEND, FRONT, PORT, QUEUE, Contender
from benchmarks.generator import GeneratorError, trafgen_argv, trafgen_config
from benchmarks.options import FULL_RATES, QUICK_RATES
from synproxy.front.service import queue_stats
from synproxy.lab.topology import SPOOFED_SOURCES, VIP, Lab, LabError, default_hosts
from synproxy.netns import unique_name

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GENERATOR_CPU = 0                # trafgen runs on this CPU; the rest of the machine is the contenders'
COUNTERS_TABLE = "synproxy_bench"
PROBE_INTERVAL = 0.02            # one real HTTP request every 20 ms while the flood runs
# Each probe request gets a source port of its own, none reused within a run: a 4-tuple reused while
# the backend still holds its previous connection in TIME_WAIT fails through the proxy (the backend
# never sees the SYN that would recycle it; docs/backend.md), and the kernel's own choice here
# reused ports after ~20 s, which read as flood losses in the later steps.
PROBE_PORTS = range(20000, 60000)
PROFILE_FILE = "front-profile.txt"


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


def keep_off_generator_cpu(pid: int | None) -> None:
    """A user-space contender gets the CPUs the generator does not use (the kernel's work on the
    flood runs where the packets arrive: on the generator's CPU)."""
    others = set(range(os.cpu_count() or 1)) - {GENERATOR_CPU}
    if pid is not None and others:
        os.sched_setaffinity(pid, others)


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine, all CPUs: user, nice, system, irq, softirq and steal."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class Bench:
    """The lab, its counters, and one measured step at a time."""

    def __init__(self, lab: Lab, seconds: float, work_dir: Path):
        self.lab = lab
        self.seconds = seconds
        self.work_dir = work_dir
        self.trafgen_config = work_dir / "syn.trafgen"
        self.next_probe_port = PROBE_PORTS.start
        with NetNS(lab.ns("router")) as ns:
            router_side = ns.get_links(ns.link_lookup(ifname="attacker")[0])[0].get_attr("IFLA_ADDRESS")
        self.trafgen_config.write_text(trafgen_config(router_side, VIP, PORT))
        # Replies to the spoofed range, counted where the router blackholes them; flood SYNs counted
        # where the backend first sees them (after the BPF program's decapsulation, for the front).
        self._counters("router", "synacks", f"ip daddr {SPOOFED_SOURCES} tcp flags & (syn|ack) == syn|ack")
        self._counters(BACKEND, "flood_syns", f"ip saddr {SPOOFED_SOURCES} tcp flags & (syn|ack) == syn")
        self.background_per_second = self._background()

    def _counters(self, host: str, name: str, match: str) -> None:
        contenders_module.nft(self.lab, host, (
            f"table inet {COUNTERS_TABLE} {{\n counter {name} {{}}\n chain prerouting {{\n"
            f"  type filter hook prerouting priority -400; policy accept;\n  {match} counter name {name}\n }}\n}}\n"))

    def counter(self, host: str, name: str) -> int:
        listing = json.loads(self.lab.run(host, ["nft", "-j", "list", "counter", "inet", COUNTERS_TABLE,
                                                 name]).stdout)
        return next(item["counter"]["packets"] for item in listing["nftables"] if "counter" in item)

    def sent_packets(self) -> int:
        with NetNS(self.lab.ns("attacker")) as ns:
            link = ns.get_links(ns.link_lookup(ifname="eth0")[0])[0]
        return link.get_attr("IFLA_STATS64")["tx_packets"]

    def queue(self) -> dict[str, int]:
        text = self.lab.run(FRONT, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        return queue_stats(QUEUE, text) or {"length": 0, "dropped": 0, "user_dropped": 0, "id_sequence": 0}

    def _background(self) -> float:
        """The idle machine's CPU use (lab processes waking up), subtracted from every step."""
        before = busy_cpu_seconds()
        time.sleep(2)
        return (busy_cpu_seconds() - before) / 2

    def snapshot(self, contender: Contender) -> dict:
        return {"time": time.monotonic(), "busy": busy_cpu_seconds(),
                "process": process_cpu_seconds(contender.pid(self.lab)), "sent": self.sent_packets(),
                "synacks": self.counter("router", "synacks"), "flood_syns": self.counter(BACKEND, "flood_syns"),
                "queue": self.queue()}

    def step(self, contender: Contender, rate: int, profile: bool = False) -> dict:
        """One flood at ``rate`` SYN/s (FLAT_OUT: unpaced) for the configured seconds, measured."""
        count = int(rate * self.seconds) if rate else 10**9
        probe = None
        if contender.serves_clients:
            probe = self.lab.popen("client", [sys.executable, "-m", "benchmarks.probe", "--target", VIP,
                                              "--port", str(PORT), "--seconds", str(self.seconds),
                                              "--interval", str(PROBE_INTERVAL),
                                              "--source-port-from", str(self._probe_ports())],
                                   stdout=subprocess.PIPE,
                                   text=True)
        profiler = self._profile(contender) if profile else None
        before = self.snapshot(contender)
        generator = self.lab.popen("attacker", trafgen_argv(self.trafgen_config, "eth0", count, rate,
                                                            GENERATOR_CPU),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            generator.wait(timeout=self.seconds + 0.2)
        except subprocess.TimeoutExpired:  # unpaced, or pacing fell behind: the step's time is up
            stop_group(generator)
        flood_seconds = time.monotonic() - before["time"]
        self._drain()
        after = self.snapshot(contender)
        legit = json.loads(probe.communicate(timeout=self.seconds + 30)[0]) if probe else None
        if profiler is not None:
            profiler.wait(timeout=60)
        return self._figures(contender, rate, flood_seconds, before, after, legit)

    def _probe_ports(self) -> int:
        """The first of the next step's probe source ports (one per request it can make)."""
        first = self.next_probe_port
        needed = int(self.seconds / PROBE_INTERVAL) + 1
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

    def _profile(self, contender: Contender) -> subprocess.Popen | None:
        pid = contender.pid(self.lab)
        if pid is None:
            return None
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(self.seconds)),
                                 "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(self.work_dir / "profile.raw")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _figures(self, contender: Contender, rate: int, flood_seconds: float, before: dict, after: dict,
                 legit: dict | None) -> dict:
        window = after["time"] - before["time"]
        sent = after["sent"] - before["sent"]
        queue_before, queue_after = before["queue"], after["queue"]
        queue_dropped = (queue_after["dropped"] + queue_after["user_dropped"]
                         - queue_before["dropped"] - queue_before["user_dropped"])
        if contender.answers == "packets read":
            answered = packets_read(queue_before, queue_after)
        elif contender.answers == "packets dropped":
            answered = sent
        else:
            answered = after["synacks"] - before["synacks"]
        process = (after["process"] - before["process"]
                   if after["process"] is not None and before["process"] is not None else None)
        return {
            "contender": contender.name, "offered_pps": rate, "seconds": round(flood_seconds, 3),
            "sent": sent, "sent_pps": round(sent / flood_seconds), "answered": answered,
            "answered_pps": round(answered / flood_seconds),
            "cpu_seconds": round(after["busy"] - before["busy"] - self.background_per_second * window, 3),
            "process_cpu_seconds": None if process is None else round(process, 3),
            "queue_dropped": queue_dropped, "flood_syns_at_backend": after["flood_syns"] - before["flood_syns"],
            "legit": legit,
        }


def packets_read(before: dict, after: dict) -> int:
    """Packets a queue's reader got between two readings of its stats. The kernel numbers a packet
    (id_sequence) only once it fits in the queue, so overflow drops ("dropped") were never numbered;
    numbered packets the socket could not take ("user_dropped") and those still queued were not read."""
    return (after["id_sequence"] - before["id_sequence"] - (after["user_dropped"] - before["user_dropped"])
            - (after["length"] - before["length"]))


def cpu_per_answer(steps: list[dict]) -> None:
    """Add µs of CPU per answer: the machine's, net of the sink's cost per packet sent at that rate."""
    sink = {s["offered_pps"]: s["cpu_seconds"] / s["sent"] for s in steps if s["contender"] == "sink" and s["sent"]}
    for s in steps:
        generator_share = sink.get(s["offered_pps"], 0.0) * s["sent"]
        answered = s["answered"]
        s["cpu_us_per_answer"] = (round(1e6 * (s["cpu_seconds"] - generator_share) / answered, 2)
                                  if answered and s["contender"] != "sink" else None)
        s["process_us_per_answer"] = (round(1e6 * s["process_cpu_seconds"] / answered, 2)
                                      if answered and s["process_cpu_seconds"] is not None else None)
        s["sink_us_per_packet"] = round(1e6 * sink[s["offered_pps"]], 3) if s["offered_pps"] in sink else None


def run(rates: tuple[int, ...], seconds: float, chosen: list[type[Contender]], output: Path,
        profile: bool) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    lab = Lab(name=unique_name("bench"), hosts=default_hosts(fronts=1, backends=1), data_plane="nfqueue")
    steps: list[dict] = []
    started = time.time()
    try:
        lab.up()
        lab.stop_process(FRONT)  # the baseline: no front process (each contender starts its own)
        bench = Bench(lab, seconds, lab.state_dir)
        for contender_class in chosen:
            contender = contender_class()
            print(f"bench: {contender.name}", file=sys.stderr, flush=True)
            contender.enter(lab)
            keep_off_generator_cpu(contender.pid(lab))
            try:
                for rate in rates:
                    profile_now = profile and contender.name == "synproxy-front" and rate == max(rates)
                    steps.append(bench.step(contender, rate, profile_now))
                    print(f"bench:   {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
                    if profile_now and (bench.work_dir / "profile.raw").exists():
                        (output / PROFILE_FILE).write_text(hot_functions(bench.work_dir / "profile.raw"))
            finally:
                contender.leave(lab)
    finally:
        lab.down()
    cpu_per_answer(steps)
    return {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started))},
        "seconds_per_step": seconds, "generator_cpu": GENERATOR_CPU,
        "contenders": {c.name: c.description for c in chosen}, "steps": steps,
    }


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
    rates = args.rates or (QUICK_RATES if args.quick else FULL_RATES)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    if not 0.5 <= seconds <= 60:
        print("synproxy bench: --seconds must be between 0.5 and 60", file=sys.stderr)
        return 2
    by_name = {c.name: c for c in contenders_module.ALL}
    wanted = [name.strip() for name in args.contenders.split(",")] if args.contenders else list(by_name)
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        print(f"synproxy bench: unknown contender {unknown[0]!r}; choose from {', '.join(by_name)}",
              file=sys.stderr)
        return 2
    chosen = [by_name["sink"]] + [by_name[name] for name in by_name if name in wanted and name != "sink"]
    try:
        results = run(rates, seconds, chosen, args.output, args.profile)
    except (GeneratorError, LabError) as error:
        print(f"synproxy bench: {error}", file=sys.stderr)
        return 1
    write_report(results, args.output)
    print(f"synproxy bench: results in {args.output}/results.md")
    return 0
