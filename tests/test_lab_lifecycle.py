"""`synproxy lab up/status/down`, including clean-up after the controller lost its state."""

from __future__ import annotations

import os

import pytest
from pyroute2 import netns

from synproxy.cli import main
from synproxy.lab.topology import Lab
from synproxy.netns import pids_inside, unique_name
from tests.lab_fixtures import needs_root

pytestmark = [pytest.mark.netns, needs_root]


def test_down_removes_everything_even_without_its_state_file(capsys):
    name = unique_name("spx")
    try:
        assert main(["lab", "up", "--name", name]) == 0
        lab = Lab(name=name)
        status = lab.status()
        assert len(status["namespaces"]) == 8 and all(status["processes"].values())
        pids = [pid for ns in status["namespaces"] for pid in pids_inside(ns)]
        assert len(pids) >= 13  # 3 fronts, 2 backend loaders, 2 Python servers, 2 nginx masters + 4 workers
        (lab.state_dir / "state.json").unlink()  # as if the controller had crashed and lost it
    finally:
        assert main(["lab", "down", "--name", name]) == 0
    assert not [n for n in netns.listnetns() if n.startswith(f"{name}-")]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert main(["lab", "status", "--name", name]) == 0
    assert '"exists": false' in capsys.readouterr().out


def test_bad_lab_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["lab", "up", "--name", "Bad Name!"])
    assert caught.value.code == 2
    assert "lower-case letters and digits" in capsys.readouterr().err
