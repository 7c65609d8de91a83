"""The flood generator's batch (benchmarks/generator.py): how many frames trafgen hands the kernel per
system call, which is how long it holds the CPU it shares with the legitimate-client probe at a time."""

import subprocess

from benchmarks.generator import trafgen_argv, trafgen_config
from benchmarks.measure import GENERATOR_CPU
from synproxy.netns import link, namespaces, unique_name
from tests.lab_fixtures import needs_root

FRAMES = 20_000
# This kernel (preempt=none) runs one sendto() of the whole ring, and the lab router's forwarding of each
# frame, without letting the probe in: at ~4.3 µs per forged ACK on CPU 0, 32 frames are ~0.15 ms of
# waiting, trafgen's default 256 were ~1.1 ms, which made the ACK flood's p99 connect (benchmarks/README.md).
MOST_FRAMES_PER_CALL = 32


@needs_root
def test_trafgen_hands_the_kernel_a_small_batch_per_system_call(tmp_path):
    config = tmp_path / "ack.trafgen"
    config.write_text(trafgen_config("02:00:00:00:00:02", "198.19.0.10", 80, "ack"))
    trace = tmp_path / "sendto.trace"
    with namespaces(unique_name("tgen"), unique_name("tgen")) as (attacker, router):
        link(attacker, "eth0", router, "attacker")
        done = subprocess.run(["ip", "netns", "exec", attacker, "strace", "-f", "-qq", "-e", "trace=sendto", "-o",
                               str(trace), *trafgen_argv(config, "eth0", GENERATOR_CPU), "--num", str(FRAMES)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = sum("sendto(" in line for line in trace.read_text().splitlines())
    assert calls and FRAMES / calls <= MOST_FRAMES_PER_CALL, f"{FRAMES} frames in {calls} sendto() calls"
