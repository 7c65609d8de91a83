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
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GENERATOR_CPU = 0
CONTENDER_CPU = 1
BPF_SYSCALL = 321          # x86_64 __NR_bpf
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


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


def steer_receive(namespace: str, interface: str, cpu: int) -> None:
    """RPS: the interface's received packets are processed on ``cpu`` (a veth has one receive queue)."""
    subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                    f"echo {1 << cpu:x} > /sys/class/net/{interface}/queues/rx-0/rps_cpus"],
                   check=True, capture_output=True, timeout=10)


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


def other_processes_cpu(lab_namespaces: set[int], also_ours: frozenset[int] = frozenset()) -> dict[int, float]:
    """utime + stime of every user-space process outside the lab's namespaces, by PID, except the
    bench itself and ``also_ours`` (its profiler): the machine is shared, and what other sessions run on the contender's CPU reads as
    the contender's. Kernel threads (softirq work on our packets among them) are left out."""
    own = os.getpid()
    seconds = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == own or int(entry.name) in also_ours:
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()
            if int(fields[6]) & PF_KTHREAD or os.stat(f"/proc/{entry.name}/ns/net").st_ino in lab_namespaces:
                continue
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes of ``after`` used since ``before`` (all of it for those started since)."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())
