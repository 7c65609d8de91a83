"""Every BPF object loads, each program within the verifier's budget with room to spare: a change that
pushes a program past the verifier's 1,000,000 instructions processed, or a chain of BPF function calls
past 512 bytes of stack (the front's SYN path uses all of them: docs/front.md, "The verifier's budget"),
fails here, naming the program and quoting the verifier, rather than as every BPF test failing to load."""

from __future__ import annotations

import re

import pytest

from synproxy.bpf.libbpf import verifier_logs
from synproxy.bpf.loading import build_object
from tests.lab_fixtures import needs_root

pytestmark = needs_root
VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS
# What a program may use of it: the front's programs once went from 875k to past the limit in one merge.
MARGIN = 0.6
PROGRAMS = ("front", "backend", "backend_xdp", "xdp_pass")


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
