import contextlib
import json
import os
from pathlib import Path

import pytest

from synproxy.bpf.loading import build_object
from synproxy.front.fastpath import FastPath

VECTORS_FILE = Path(__file__).parent / "vectors" / "cookies.json"
ENCAP_VECTORS_FILE = VECTORS_FILE.with_name("encap.json")


@pytest.fixture(scope="session")
def cookie_vectors() -> dict:
    return json.loads(VECTORS_FILE.read_text())


@pytest.fixture(scope="session")
def encap_vectors() -> dict:
    return json.loads(ENCAP_VECTORS_FILE.read_text())


@pytest.fixture(scope="module")
def fast_path(policy, schedule):
    """The front's programs loaded (not attached) and configured with the requesting module's own
    `policy` and `schedule` fixtures."""
    loaded = FastPath(build_object("front"))
    loaded.configure(policy, schedule)
    yield loaded
    loaded.close()


@contextlib.contextmanager
def on_cpu(cpu: int):
    """This thread on one CPU for the block: BPF_PROG_TEST_RUN runs the program on the caller's CPU."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


@pytest.fixture
def one_cpu():
    """The test on one CPU: a per-CPU token bucket (the backend's resets, the front's ICMP errors) holds that
    CPU's share."""
    with on_cpu(min(os.sched_getaffinity(0))):
        yield
