"""The flood generator: netsniff-ng's trafgen (PACKET_MMAP), spoofed random sources, paced or flat out.

Python's raw-socket flood tops out near 30-40k SYN/s here and hping3 near 110-150k; trafgen sends
about 480k SYN/s into an early drop on this 2-core VM, so it is not what saturates first. It sends
the packets of its configuration in turn: the mixed flood is one SYN template and one ACK template.
It always runs flat out on its own CPU; a token bucket in the router (`pacer`) sets the offered rate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SPOOFED_SECOND_HALF = (198, 18)  # sources 198.18.128.0/17, the lab's spoofed range
SYN_OPTIONS = (0x02, 0x04, 0x05, 0xB4,  # MSS 1460
               0x04, 0x02,              # SACK permitted
               0x01, 0x03, 0x03, 0x07,  # NOP, window scale 7
               0x01, 0x01)              # NOP NOP: the header is 32 bytes, data offset 8
PACER_TABLE = "synproxy_bench_pacer"
FLOODS = {"syn": ("syn",), "ack": ("ack",), "mixed": ("syn", "ack")}  # a flood's packet templates, in turn
# trafgen's transmit ring (PACKET_MMAP, frames of 2 KiB). It fills the ring, then hands all of it to the
# kernel in one sendto(); this kernel (preempt=none) sends every frame of it, the lab router's forwarding
# included, without a preemption point, so the probe on the same CPU (SCHED_FIFO) waits for the whole
# batch when its SYN-ACK arrives meanwhile. trafgen's default, 256 frames, held CPU 0 ~1.1 ms at a time
# under the ACK flood: 10-30 % of probe requests connected in 1.0-1.3 ms against 0.16-0.2 ms for the
# rest (p99 1.02-1.29 ms). 32 frames bound that wait to ~0.15 ms (p99 0.47-0.49 ms), one system call
# per 32 frames instead of 256 (benchmarks/README.md, "The generator's batch").
TX_RING_KIB = 64
TX_FRAME_BYTES = 2048  # trafgen's frame without --jumbo-support


class GeneratorError(RuntimeError):
    pass


def _template(kind: str, mac: str, target_bytes: str, port: int) -> str:
    """A SYN (options as Linux sends them) or a bare ACK whose sequence and acknowledgment numbers,
    so its cookie, are random: random source in 198.18.128.0/17, source port and IP id per packet."""
    options = ", ".join(f"0x{byte:02x}" for byte in SYN_OPTIONS)
    length, flags, ack, tail = ((52, "c16(0x8002)", "c32(0)", f",\n  {options}") if kind == "syn"
                                else (40, "c16(0x5010)", "drnd(4)", ""))
    return (
        "{\n"
        f"  {mac},\n  0x02, 0x00, 0x00, 0x00, 0x00, 0x01,\n  c16(0x0800),\n"
        f"  0x45, 0, c16({length}), drnd(2), 0x40, 0, 64, 6, csumip(14, 33),\n"
        f"  {SPOOFED_SECOND_HALF[0]}, {SPOOFED_SECOND_HALF[1]}, dinc(128, 255), drnd(1),\n"
        f"  {target_bytes},\n"
        f"  drnd(2), c16({port}), drnd(4), {ack},\n"
        f"  {flags}, c16(64240), csumtcp(14, 34), c16(0){tail}\n"
        "}\n")


def trafgen_config(destination_mac: str, target: str, port: int, flood: str = "syn") -> str:
    """The templates of one flood (FLOODS) towards ``target``:``port`` through ``destination_mac``."""
    mac = ", ".join(f"0x{octet}" for octet in destination_mac.split(":"))
    target_bytes = ", ".join(target.split("."))
    return "".join(_template(kind, mac, target_bytes, port) for kind in FLOODS[flood])


def trafgen_argv(config: Path, interface: str, cpu: int) -> list[str]:
    """trafgen on one CPU, sending as fast as it can until stopped, TX_RING_KIB at a time. It is never
    paced: its --gap sleeps cost ~40 µs more than asked on this VM (50-77 % of the nominal rate at
    10-20k/s, and no rate above ~25k/s), and its --rate sends each second's packets in one burst. The
    router paces instead."""
    binary = shutil.which("trafgen")
    if binary is None:
        raise GeneratorError("trafgen not found: install Debian's netsniff-ng package")
    return ["taskset", "-c", str(cpu), binary, "--no-sock-mem", "--cpp", "--cpus", "1", "--ring-size",
            f"{TX_RING_KIB}KiB", "--in", str(config), "--out", interface]


def pacer(rate: int, interface: str) -> str:
    """nftables for the router: what arrives from the generator's ``interface`` beyond ``rate`` packets/s
    (0: no limit) is dropped at the router's first hook, and what passes is counted ("delivered")."""
    limit = f"  iifname {interface} limit rate over {rate}/second burst 64 packets drop\n" if rate else ""
    return (f"table inet {PACER_TABLE} {{\n counter delivered {{}}\n chain prerouting {{\n"
            f"  type filter hook prerouting priority -300; policy accept;\n{limit}"
            f"  iifname {interface} counter name delivered\n }}\n}}\n")
