"""Every BPF object loads, each program within the verifier's budget with room to spare: a change that
pushes a program past the verifier's 1,000,000 instructions processed, or a chain of BPF function calls
past 512 bytes of stack (the front's SYN path uses all of them: docs/front.md, "The verifier's budget"),
fails here, naming the program and quoting the verifier, rather than as every BPF test failing to load.
And every map an object creates is one its programs use: a map is allocated whether used or not."""

from __future__ import annotations

import os
import re

import pytest

from synproxy.backend.loader import XDP_SHARED_MAPS
from synproxy.bpf.libbpf import BpfObject, program_id, program_maps, verifier_logs
from synproxy.bpf.loading import build_object
from tests.lab_fixtures import needs_root

pytestmark = needs_root
VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS
# What a program may use of it: the front's programs once went from 875k to past the limit in one merge.
MARGIN = 0.6
PROGRAMS = ("front", "backend", "backend_xdp", "xdp_pass")
# Maps an object declares only to be handed another object's (bpf_map__reuse_fd): allocated once, by that one.
REUSED = {"backend_xdp": set(XDP_SHARED_MAPS)}
KERNEL_NAME_LENGTH = 15  # BPF_OBJ_NAME_LEN - 1: what program_maps sees of a map's name


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_loads_within_the_verifiers_budget(program):
    result, logs = verifier_logs(build_object(program))
    # The verifier logs its reason before its statistics; libbpf loads no program after a refused one.
    reasons = {name: [line for line in log.splitlines() if not line.startswith(("verification time", "processed"))]
               for name, log in logs.items() if log}
    assert not result, f"the verifier refused a program of {program}.bpf.c: {reasons}"
    for name, log in logs.items():
        processed = int(re.search(r"^processed (\d+) insns", log, re.MULTILINE).group(1))
        assert processed <= MARGIN * VERIFIER_LIMIT, (
            f"{name}: {processed} instructions processed, past {MARGIN:.0%} of the verifier's {VERIFIER_LIMIT}")


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_map_an_object_creates_is_used_by_its_programs(program):
    """The front once carried the backends' `protected_ports` hash (82,960 bytes), unused."""
    loaded = BpfObject(build_object(program))
    try:
        found = [program_maps(program_id(fd)) for fd in loaded.program_fds().values()]
        created = loaded.map_names()
    finally:
        loaded.close()
    used = {name for maps in found for name in maps}
    for maps in found:
        for opened in maps.values():
            os.close(opened.fd)
    unused = {name for name in created if name[:KERNEL_NAME_LENGTH] not in used} - REUSED.get(program, set())
    assert not unused, f"{program}.bpf.c creates maps none of its programs uses: {sorted(unused)}"
