"""How the bench times an upload (benchmarks/harness.py, Bench.upload): the client receives on the generator's
CPU for the upload only (the server's ACKs, and the client's sending they clock, stay off the contender's
CPU), and bpf_stats, which slows only the contenders with programs, is off while it is timed."""

import subprocess

import pytest

from benchmarks.measure import CONTENDER_CPU, GENERATOR_CPU, BpfStats, program_stats, receive_steered
from synproxy.bpf.libbpf import BpfObject, prog_test_run, program_id
from synproxy.bpf.loading import build_object
from synproxy.netns import link, namespaces, unique_name


def rps_mask(namespace: str, interface: str) -> int:
    """Read through `ip netns exec`, which mounts the namespace's own /sys (setns alone does not)."""
    done = subprocess.run(["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/{interface}/queues/rx-0/rps_cpus"],
                          check=True, capture_output=True, text=True, timeout=10)
    return int(done.stdout.strip().replace(",", ""), 16)


def test_receive_is_steered_for_the_block_only_even_when_it_fails():
    with namespaces(unique_name("steer"), unique_name("steer")) as (client, router):
        link(client, "eth0", router, "client")
        assert rps_mask(client, "eth0") == 0
        with receive_steered(client, "eth0", GENERATOR_CPU):
            assert rps_mask(client, "eth0") == 1 << GENERATOR_CPU
        assert rps_mask(client, "eth0") == 0
        with pytest.raises(RuntimeError), receive_steered(client, "eth0", CONTENDER_CPU):
            assert rps_mask(client, "eth0") == 1 << CONTENDER_CPU
            raise RuntimeError("the upload failed")
        assert rps_mask(client, "eth0") == 0


def test_bpf_stats_are_off_while_paused_and_on_again_after():
    """Whether the kernel accounts a program's runs: bpf/xdp_pass.bpf.c run under BPF_PROG_TEST_RUN, its run
    count read back (the sysctl does not show a descriptor's hold)."""
    program = BpfObject(build_object("xdp_pass"))
    prog_fd = program.program_fd("xdp_pass")
    prog = program_id(prog_fd)

    def accounted() -> bool:
        before = program_stats({prog}).get(prog, (0, 0))[1]
        prog_test_run(prog_fd, bytes(64), repeat=10)
        return program_stats({prog}).get(prog, (0, 0))[1] > before

    try:
        if accounted():
            pytest.skip("another holder keeps bpf_stats on")
        stats = BpfStats()
        try:
            assert accounted()
            with stats.paused() as sysctl_on:
                assert not sysctl_on and not accounted()
            assert accounted()
            with pytest.raises(RuntimeError), stats.paused():
                raise RuntimeError("the upload failed")
            assert accounted()
        finally:
            stats.close()
        assert not accounted()
    finally:
        program.close()
