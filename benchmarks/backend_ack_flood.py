"""What a forged ACK costs a backend: the program's own time and the backend's CPU under a bounded flood.

A sender namespace sends PACKETS encapsulated forged ACKs (random sequence numbers, client ports no
connection uses, MACed as a front forwards them, unflagged) to a backend namespace running `synproxy
backend`, with a listener on the VIP and port (which answers what reaches it with a RST). The sender is
pinned to CPU 0. A veth delivers in the sender's context: each send runs the backend's receive path,
its program and its kernel's answer in the softirq the send raises, on the sender's CPU and charged to
the sender (tick-based accounting charges softirq time to the task it interrupts). So the figures are
read from the sender's own CPU time, which other processes on the machine do not inflate:

- `program_ns`: the program's run_time_ns / run_cnt (`kernel.bpf_stats_enabled`, restored afterwards);
- `cpu_ns`: the sender's CPU time (user + system, wait4's rusage) plus ksoftirqd/0's, per packet sent:
  building and sending in Python, the veth, the backend's whole path and the RST's way back (dropped
  by the sender namespace's raw table); the backend's share is the difference between variants;
- `resets`: RSTs the backend's kernel sent (nstat TcpOutRsts).

Variants (interleaved, RUNS times each): `main` (the code at MAIN_CHECKOUT: every forged ACK reaches
the listener), and this checkout with `backend.unknown_flow_resets_per_second` 1000000 (no limit in
practice), 1000 (the default) and 0.

    flock /tmp/synproxy-lab.lock python3 -m benchmarks.backend_ack_flood [--packets N] [--runs N] [--main DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synproxy import encap, netns
from synproxy.backend.loader import TC_HANDLE, TC_PRIORITY
from synproxy.bpf.libbpf import tc_attached_program
from synproxy.bpf.loading import interface_index
from synproxy.packet import ACK, build_tcp_packet, parse_tcp

VIP, BACKEND, FRONT, CLIENT = "198.19.0.10", "198.18.0.1", "198.18.0.3", "198.18.0.2"
PORT, ENCAP_PORT = 8080, 6080
BACKEND_IF, SENDER_IF = "be0", "sn0"
SENDER_CPU = 0
DISTINCT_PACKETS = 10_000  # cycled: the tuples repeat, the lookups still find nothing
THIS_CHECKOUT = Path(__file__).resolve().parents[1]


def ksoftirqd_ns(cpu: int) -> int:
    """CPU time of ksoftirqd/``cpu`` so far (softirq work the sender's context left to it)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no ksoftirqd/{cpu}")


def out_resets(namespace: str) -> int:
    output = netns.run(namespace, ["nstat", "-az", "TcpOutRsts"]).stdout
    return int(output.split("TcpOutRsts")[1].split()[0])


def program_stats(prog_id: int) -> tuple[int, int]:
    """The program's run_time_ns and run_cnt (0 while kernel.bpf_stats_enabled is 0)."""
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"], check=True,
                                      capture_output=True, text=True).stdout)
    return shown.get("run_time_ns", 0), shown.get("run_cnt", 0)


def forged_acks(secret: bytes) -> list[bytes]:
    saddr, daddr = (ipaddress.ip_address(a).packed for a in (CLIENT, VIP))
    front, backend = ipaddress.ip_address(FRONT).packed, ipaddress.ip_address(BACKEND).packed
    key = encap.encap_key(secret)
    packets = []
    for index in range(DISTINCT_PACKETS):
        seq, ack = struct.unpack("II", os.urandom(8))
        inner = build_tcp_packet(saddr, daddr, 20000 + index, PORT, seq, ack, ACK, 4096)
        packets.append(encap.encapsulate(inner, parse_tcp(inner), front, backend, ENCAP_PORT, 0, False, key))
    return packets


def send(sender_ns: str, packets: list[bytes], count: int) -> tuple[float, float]:
    """Send ``count`` packets from a child pinned to the sender CPU: the seconds it took, and its CPU time."""
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        failed = 1
        try:
            os.sched_setaffinity(0, {SENDER_CPU})
            with netns.inside(sender_ns):
                sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for index in range(count):
                sender.sendto(packets[index % len(packets)], (BACKEND, 0))
            failed = 0
        finally:
            os._exit(failed)
    _, status, usage = os.wait4(child, 0)
    if status:
        raise RuntimeError("the sender failed")
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def backend_loader(backend_ns: str, checkout: Path, config: Path, log: Path):
    """`synproxy backend` of ``checkout`` running in the backend namespace until the block ends."""
    environment = dict(os.environ, PYTHONPATH=str(checkout),
                       SYNPROXY_BUILD_DIR=str(Path(tempfile.gettempdir()) / "synproxy-ackflood-build"))
    with open(log, "wb") as output:
        loader = netns.popen(backend_ns, [sys.executable, "-m", "synproxy.cli", "backend", "--config", str(config)],
                             stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=checkout)
    try:
        deadline = time.monotonic() + 60
        while '"event": "backend_attached"' not in log.read_text(errors="replace"):
            if loader.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the loader did not attach:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        with netns.inside(backend_ns):
            prog_id = tc_attached_program(interface_index(BACKEND_IF), TC_HANDLE, TC_PRIORITY)
        yield prog_id
    finally:
        loader.send_signal(signal.SIGTERM)
        try:
            loader.wait(10)
        except subprocess.TimeoutExpired:
            loader.kill()
            loader.wait()


def measure(backend_ns: str, prog_id: int, send_flood) -> dict:
    resets, (run_time, run_cnt), softirqd = out_resets(backend_ns), program_stats(prog_id), ksoftirqd_ns(SENDER_CPU)
    seconds, sender_cpu = send_flood()
    time.sleep(0.3)  # the backlog drains
    run_time_after, run_cnt_after = program_stats(prog_id)
    handled = run_cnt_after - run_cnt
    sent = handled  # every packet reaches the program (checked below)
    return {"handled": handled, "send_rate": round(sent / seconds),
            "program_ns": round((run_time_after - run_time) / max(handled, 1)),
            "cpu_ns": round((sender_cpu * 1e9 + ksoftirqd_ns(SENDER_CPU) - softirqd) / max(sent, 1)),
            "resets": out_resets(backend_ns) - resets}


def write_config(directory: Path, secret: bytes, budget: int | None) -> Path:
    secret_file = directory / "secret.hex"
    secret_file.write_text(secret.hex() + "\n")
    secret_file.chmod(0o600)
    config = directory / f"synproxy-{budget}.yaml"
    budget_line = "" if budget is None else f"  unknown_flow_resets_per_second: {budget}\n"
    config.write_text(f"vips: [{VIP}]\nports: [{PORT}]\nsecret_file: {secret_file}\nfronts: [{FRONT}]\n"
                      f"backends: [{BACKEND}]\nencap_port: {ENCAP_PORT}\nbackend:\n  interface: {BACKEND_IF}\n"
                      f"{budget_line}")
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--main", type=Path, default=Path("/work/main"), help="the checkout measured as `main`")
    args = parser.parse_args()
    variants = [("main", args.main, None)] + [(f"budget {budget}", THIS_CHECKOUT, budget)
                                              for budget in (1_000_000, 1000, 0)]
    secret = os.urandom(32)
    packets = forged_acks(secret)
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_path.read_text().strip()
    backend_ns, sender_ns = netns.unique_name("spfb"), netns.unique_name("spfs")
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as directory, netns.namespaces(backend_ns, sender_ns), \
            contextlib.ExitStack() as cleanup:
        netns.link(backend_ns, BACKEND_IF, sender_ns, SENDER_IF)
        netns.add_addresses(backend_ns, BACKEND_IF, f"{BACKEND}/24")
        netns.add_addresses(backend_ns, "lo", f"{VIP}/32")
        netns.add_addresses(sender_ns, SENDER_IF, f"{FRONT}/24", f"{CLIENT}/24")
        netns.add_route(sender_ns, f"{VIP}/32", BACKEND)
        # The sender's kernel must not answer the backend's RSTs: dropped as early as it can.
        netns.run(sender_ns, ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "-j", "DROP"])
        with netns.inside(backend_ns):
            cleanup.enter_context(socket.create_server((VIP, PORT), backlog=socket.SOMAXCONN))
        cleanup.callback(stats_path.write_text, stats_before)
        stats_path.write_text("1")
        for run in range(args.runs):
            for name, checkout, budget in variants:
                config = write_config(Path(directory), secret, budget)
                with backend_loader(backend_ns, checkout, config, Path(directory) / "loader.log") as prog_id:
                    result = measure(backend_ns, prog_id, lambda: send(sender_ns, packets, args.packets))
                if result["handled"] < args.packets:
                    raise RuntimeError(f"{name}: the program saw {result['handled']} of {args.packets} packets")
                results[name].append(result)
                print(json.dumps({"run": run, "variant": name, **result}), flush=True)
    print("variant: median [min-max] over runs")
    for name, runs in results.items():
        summary = {key: (statistics.median(r[key] for r in runs), min(r[key] for r in runs), max(r[key] for r in runs))
                   for key in ("program_ns", "cpu_ns", "resets", "send_rate")}
        print(f"{name:16} " + "  ".join(f"{key} {med:g} [{low:g}-{high:g}]" for key, (med, low, high) in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
