"""`synproxy bench --quick`: every contender produces figures (speed is reported, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.harness import hot_functions, packets_read
from benchmarks.options import rate_list
from benchmarks.report import PLOTS, matched_ratio
from tests.lab_fixtures import needs_root


@pytest.mark.netns
@needs_root
def test_quick_bench_gives_figures_for_every_contender(tmp_path):
    done = subprocess.run([sys.executable, "-m", "synproxy.cli", "bench", "--quick", "--output", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["contenders"]) == {"sink", "nfqueue-floor", "nfqueue-answer-floor", "synproxy-front",
                                          "synproxy-front-fast-path", "kernel-syncookies", "iptables-synproxy"}
    for name, figures in results["summary"].items():
        steps = [s for s in results["steps"] if s["contender"] == name]
        assert len(steps) == 2 and all(s["sent"] > 0 and s["answered"] > 0 for s in steps), name
        assert figures["capacity_pps"] > 0, name
        if name != "sink":
            assert figures["cpu_us"] is not None, name
        if name in ("synproxy-front", "synproxy-front-fast-path", "kernel-syncookies", "iptables-synproxy"):
            assert all(s["legit"]["attempts"] > 0 for s in steps), name
    assert "| synproxy-front |" in (tmp_path / "results.md").read_text()
    for plot in PLOTS:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_packets_read_leaves_out_what_the_reader_never_got():
    """An overflowing queue: the kernel numbers only packets that fit (the CI run that counted its
    overflow drops against the numbered ones reported a negative count)."""
    before = {"id_sequence": 1000, "dropped": 5, "user_dropped": 2, "length": 0}
    after = {"id_sequence": 37000, "dropped": 60000, "user_dropped": 12, "length": 40}
    assert packets_read(before, after) == 36000 - 10 - 40


def test_matched_ratio_is_the_median_over_common_unsaturated_paced_rates():
    def step(name, rate, cost, answered=100):
        return {"contender": name, "offered_pps": rate, "cpu_us_per_answer": cost, "answered": answered, "sent": 100}
    results = {"steps": [step("a", 10, 2.0), step("b", 10, 4.0), step("a", 20, 3.0), step("b", 20, 3.0),
                         step("a", 40, 9.0), step("b", 40, 0.1),          # one far-off step
                         step("a", 80, 1.0, answered=50), step("b", 80, 1.0),  # saturated: left out
                         step("a", 0, 1.0), step("b", 0, 1.0)]}            # unpaced: left out
    assert matched_ratio(results, "a", "b", "cpu_us_per_answer") == ([10, 20, 40], 1.0)
    assert matched_ratio(results, "a", "c", "cpu_us_per_answer") is None


def test_rates_parse_and_bad_ones_are_refused():
    assert rate_list("10000, 20000,max") == (10000, 20000, 0)
    for bad in ("fast", "-5", "10,,20", "99999999"):
        with pytest.raises(Exception, match="SYN/s"):
            rate_list(bad)


@pytest.mark.parametrize("arguments, message", [
    (["--rates", "fast"], "SYN/s"),
    (["--seconds", "0.1"], "--seconds"),
    (["--contenders", "synproxy-front,nope"], "unknown contender 'nope'"),
])
def test_bad_bench_arguments_exit_cleanly(arguments, message):
    if "--rates" not in arguments and os.geteuid() != 0:
        pytest.skip("the bench checks root before its other arguments")
    done = subprocess.run([sys.executable, "-m", "synproxy.cli", "bench", *arguments],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and message in done.stderr


def test_profile_summary_counts_inclusive_and_own_time(tmp_path):
    raw = tmp_path / "profile.raw"
    raw.write_text("main (a.py:1);loop (a.py:5);handle (h.py:9) 30\nmain (a.py:1);loop (a.py:6) 10\n")
    text = hot_functions(raw)
    assert "40 samples" in text
    assert "100.0   0.0  main" in text and " 75.0  75.0  handle" in text and "100.0  25.0  loop" in text
