"""What the bench reads: each CPU's busy time, and the BPF programs' own run time (bpf_stats).

The generator runs on GENERATOR_CPU; everything the contender does is steered to CONTENDER_CPU: its
processes (every thread) are pinned there, and the receive work of the hosts it runs on lands there
by RPS on their interface. So the contender CPU's busy time, less an idle step's, is the contender's.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GENERATOR_CPU = 0
CONTENDER_CPU = 1
BPF_SYSCALL = 321          # x86_64 __NR_bpf
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
NAPI_PRIORITY = 50         # SCHED_FIFO priority of a pinned NAPI thread (steer_napi)


def busy_per_cpu() -> dict[int, float]:
    """CPU seconds each CPU spent busy: user, nice, system, irq, softirq and steal (/proc/stat)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
            busy[int(name[3:])] = (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
    return busy


def process_cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (all threads)


def pin_process(pid: int | None, cpu: int) -> None:
    """Every thread of a process onto one CPU (sched_setaffinity on the PID moves only its main thread)."""
    if pid is None:
        return
    try:
        tasks = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for task in tasks:
        try:
            os.sched_setaffinity(task, {cpu})
        except OSError:  # the thread ended meanwhile
            pass


def process_tree(pid: int | None) -> list[int]:
    """A process and its children (nginx's master and its workers): the kernel here has no
    /proc/PID/task/TID/children, so read every process's parent."""
    if pid is None:
        return []
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(entry.name))
        except OSError:  # it ended meanwhile
            pass
    return [pid, *children]


def steer_receive(namespace: str, interface: str, cpu: int | None) -> None:
    """RPS: the interface's received packets are processed on ``cpu`` (a veth has one receive queue);
    None: no RPS, the kernel's default (on the CPU that delivered them)."""
    mask = 0 if cpu is None else 1 << cpu
    subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                    f"echo {mask:x} > /sys/class/net/{interface}/queues/rx-0/rps_cpus"],
                   check=True, capture_output=True, timeout=10)


@contextmanager
def receive_steered(namespace: str, interface: str, cpu: int | None, after: int | None = None) -> Iterator[None]:
    """RPS onto ``cpu`` for the block only (None: none), then onto ``after`` (default: the kernel's default)."""
    steer_receive(namespace, interface, cpu)
    try:
        yield
    finally:
        steer_receive(namespace, interface, after)


def steer_napi(namespace: str, interface: str, cpu: int) -> list[int]:
    """Native XDP on a veth runs in the receiving queue's NAPI poll, which the kernel schedules on the
    sending CPU (the router's forwarding, on the generator's CPU): RPS comes after XDP and cannot move
    it. Threaded NAPI gives the poll a kernel thread, ``napi/<interface>-<id>``, which is pinned to
    ``cpu`` and made SCHED_FIFO (NAPI_PRIORITY, that of threaded interrupt handlers): the receive work
    RPS hands the other contenders runs in softirq, before any task on its CPU, while a thread at the
    normal policy waited behind the backend's servers and other sessions' tests, and the veth's
    256-frame ring overflowed meanwhile (1.6k of 39k frames at 40k/s in 3 s under other sessions' load). The thread
    exists while a program is attached (the setting outlives a detach; each attach makes a new
    thread), so call this after the program is attached. Returns the threads pinned. The thread is
    found by name: another namespace's threaded ``interface`` would be pinned too (nothing else on this
    machine turns threaded NAPI on)."""
    done = subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                           f"echo 1 > /sys/class/net/{interface}/threaded"],
                          capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:  # no NAPI instance (no XDP program on a veth): nothing runs in a poll
        return []
    pinned = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and Path(f"/proc/{entry.name}/comm").read_text().startswith(f"napi/{interface}-"):
                os.sched_setaffinity(int(entry.name), {cpu})
                os.sched_setscheduler(int(entry.name), os.SCHED_FIFO, os.sched_param(NAPI_PRIORITY))
                pinned.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pinned


VETH_DROP_WORDS = ("drop", "err")


def veth_drops(namespace: str, interface: str) -> dict[str, int]:
    """A veth end's drop and error counters: the interface's rx/tx_dropped and every ethtool statistic
    naming a drop or an error (a veth with native XDP drops frames when its peer's 256-frame ring is
    full, before any program runs; NOTES.md: 6 runs of a program for 1.62M frames sent)."""
    counters = {}
    done = subprocess.run(["ip", "netns", "exec", namespace, "ip", "-j", "-s", "link", "show", "dev", interface],
                          capture_output=True, text=True, timeout=10, check=False)
    for link in json.loads(done.stdout or "[]"):
        stats = link.get("stats64", {})
        counters["rx_dropped"] = stats.get("rx", {}).get("dropped", 0)
        counters["tx_dropped"] = stats.get("tx", {}).get("dropped", 0)
    done = subprocess.run(["ip", "netns", "exec", namespace, "ethtool", "-S", interface],
                          capture_output=True, text=True, timeout=10, check=False)
    for line in done.stdout.splitlines():
        name, _, value = line.strip().partition(": ")
        if any(word in name for word in VETH_DROP_WORDS) and value.strip().isdigit():
            counters[name] = int(value)
    return counters


def enable_bpf_stats() -> int:
    """Turn the kernel's per-program run time accounting on while the returned descriptor is open
    (BPF_ENABLE_STATS: kernel.bpf_stats_enabled counts it; closing restores the previous state, even
    when the bench dies)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(ctypes.c_uint32(BPF_STATS_RUN_TIME).value.to_bytes(4, "little"), 16)
    fd = libc.syscall(BPF_SYSCALL, BPF_ENABLE_STATS, attr, 16)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_ENABLE_STATS: {os.strerror(ctypes.get_errno())}")
    return fd


def bpf_stats_sysctl_on() -> bool:
    """kernel.bpf_stats_enabled: the sysctl's own setting (a BPF_ENABLE_STATS descriptor does not show there)."""
    return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"


class BpfStats:
    """The bench's hold on bpf_stats (enable_bpf_stats) for the run, let go around a timed upload: with it
    on, every program run reads the clock twice (sched_clock, a paravirtual clock read on this VM), which
    only the contenders with programs pay. Through the default front (three programs per packet: the
    front's, the lab router's, the backend's stage), 400 MB uploads ran 9-10 % slower with it on
    (benchmarks/README.md, "The upload's client on CPU 0")."""

    def __init__(self) -> None:
        self.fd: int | None = enable_bpf_stats()

    @contextmanager
    def paused(self) -> Iterator[bool]:
        """Stats off for the block, unless another holder keeps them on: yields whether the sysctl does
        (another process's descriptor cannot be seen)."""
        self.close()
        try:
            yield bpf_stats_sysctl_on()
        finally:
            self.fd = enable_bpf_stats()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def attached_programs(namespace: str) -> dict[int, str]:
    """The BPF programs attached to a namespace's interfaces (XDP and tc): id -> "device kind name"."""
    done = subprocess.run(["ip", "netns", "exec", namespace, "bpftool", "-j", "net", "show"],
                          capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        return {}
    programs = {}
    for group in json.loads(done.stdout or "[]"):
        for kind in ("xdp", "tc"):
            for entry in group.get(kind, []):
                if "id" in entry:
                    where = entry.get("kind", kind)
                    programs[entry["id"]] = f"{entry.get('devname', '?')} {where} {entry.get('name', '')}".strip()
    return programs


def program_stats(ids: set[int]) -> dict[int, tuple[int, int]]:
    """run_time_ns and run_cnt of the given programs (bpftool prog show)."""
    if not ids:
        return {}
    done = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, timeout=10,
                          check=False)
    if done.returncode != 0:
        return {}
    return {prog["id"]: (prog.get("run_time_ns", 0), prog.get("run_cnt", 0))
            for prog in json.loads(done.stdout or "[]") if prog.get("id") in ids}


def backlog_drops() -> int:
    """Packets the CPUs' receive backlogs dropped (/proc/net/softnet_stat, second column, all CPUs): RPS
    hands packets to the contender CPU through its backlog (net.core.netdev_max_backlog), which drops
    what does not fit while that CPU is busy, before any contender sees it."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


PF_KTHREAD = 0x00200000


def namespace_inodes(names: list[str]) -> set[int]:
    return {os.stat(f"/run/netns/{name}").st_ino for name in names if os.path.exists(f"/run/netns/{name}")}


class OtherLoad:
    """Other sessions' CPU time, per CPU. The machine is shared, and what another session runs on the
    contender's CPU reads as the contender's in /proc/stat. A thread (on the generator's CPU) samples
    every user-space process outside the lab's namespaces, except the bench itself and ``also_ours``,
    20 times a second, and charges the utime + stime each used since its last sample to the CPU it last
    ran on (/proc/PID/stat "processor"). Kernel threads (softirq work on our packets among them) are
    left out. Approximate: a process that moved between CPUs within 50 ms is charged to the last one,
    and a timer tick that hit one of them while softirq ran on our packets is charged to it."""

    def __init__(self, lab_namespaces: set[int], interval: float = 0.05):
        self.lab_namespaces = lab_namespaces
        self.interval = interval
        self.also_ours: frozenset[int] = frozenset()
        self.per_cpu: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sample(charge=False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        os.sched_setaffinity(0, {GENERATOR_CPU})
        while not self._stop.wait(self.interval):
            self._sample(charge=True)

    def _sample(self, charge: bool) -> None:
        own = os.getpid()
        seen = {}
        charged: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == own or int(entry.name) in self.also_ours:
                continue
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()
                if int(fields[6]) & PF_KTHREAD or os.stat(f"/proc/{entry.name}/ns/net").st_ino in self.lab_namespaces:
                    continue
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            pid = int(entry.name)
            seen[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            used = seen[pid] - self._last.get(pid, seen[pid] if not charge else 0.0)
            if used > 0:
                charged[int(fields[36])] = charged.get(int(fields[36]), 0.0) + used
        with self._lock:
            self._last = seen
            for cpu, used in charged.items():
                self.per_cpu[cpu] = self.per_cpu.get(cpu, 0.0) + used

    def totals(self) -> dict[int, float]:
        with self._lock:
            return dict(self.per_cpu)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def cpu_since(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """Per CPU, what OtherLoad charged between two of its totals."""
    return {cpu: used - before.get(cpu, 0.0) for cpu, used in after.items()}
