"""The upload's client receives on the generator's CPU for the upload only (benchmarks/harness.py, Bench.upload):
the server's ACKs, and the client's sending they clock, stay off the contender's CPU."""

import subprocess

import pytest

from benchmarks.measure import CONTENDER_CPU, GENERATOR_CPU, receive_steered
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
