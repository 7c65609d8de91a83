"""`synproxy bench --quick`: every contender and scenario produces figures (speed is reported, never
asserted), and the method's arithmetic: the idle step's rates subtracted, the sink's share, the order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report
from benchmarks.contenders import ALL
from benchmarks.generator import pacer, trafgen_config
from benchmarks.harness import figures, hot_functions, packets_read, rotated
from benchmarks.options import rate_list, scenario_list
from benchmarks.report import PLOTS, add_sink_share, ratios, spread, summarise
from tests.lab_fixtures import needs_root

SERVING = {"synproxy-front", "synproxy-front-fast-path", "kernel-syncookies", "iptables-synproxy"}


@pytest.mark.netns
@needs_root
def test_quick_bench_gives_figures_for_every_contender_and_scenario(tmp_path):
    done = subprocess.run([sys.executable, "-m", "synproxy.cli", "bench", "--quick", "--output", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["contenders"]) == {c.name for c in ALL}
    for name in results["contenders"]:
        syn = [s for s in results["steps"] if s["contender"] == name and s["scenario"] == "syn"]
        assert len(syn) == 2 and all(s["sent"] > 0 and s["answered"] > 0 for s in syn), name
        assert results["summary"][name]["capacity"]["median"] > 0, name
        if name != "sink":
            assert all(s["cpu_us_per_answer"] is not None for s in syn), name
        floods = [s for s in results["steps"] if s["contender"] == name and s["scenario"] in ("ack", "mixed")]
        assert len(floods) == (2 if name in SERVING else 0), name
        # The same probe runs against every contender, in the idle step and the flood step.
        for s in syn + floods:
            assert s["legit"]["attempts"] > 0 and s["idle_legit"]["attempts"] > 0, name
            assert s["idle_seconds"] > 0 and set(s["idle_cpu_per_second"]) == {"0", "1"}, name
            assert s["cpu_us_per_packet"] is not None and s["generator_cpu_us_per_packet"] is not None, name
    fast_path_top = next(s for s in results["steps"] if s["contender"] == "synproxy-front-fast-path"
                         and s["scenario"] == "syn" and s["offered_pps"] == 0)
    front_program = [p for where, p in fast_path_top["bpf"].items() if where.startswith("front0")]
    assert front_program and front_program[0]["runs"] > 0 and front_program[0]["ns_per_run"] > 0
    uploads = {u["contender"]: u for u in results["uploads"]}
    assert set(uploads) == SERVING and all(u["bytes"] > 0 and u["mb_per_second"] > 0 for u in uploads.values())
    report = (tmp_path / "results.md").read_text()
    assert "| synproxy-front |" in report and "## Bulk upload" in report and "| ack | synproxy-front" in report
    # The connection-rate scenario (benchmarks/connection_rate.py): both routes, both load modes, both floods.
    connections = results["connections"]
    assert {(c["route"], c["mode"], c["flood"]) for c in connections} == {
        *((route, mode, None) for route in ("proxy", "bypass") for mode in ("new", "keepalive")),
        *((route, "new", flood) for route in ("proxy", "bypass") for flood in ("syn", "ack"))}
    assert all(c["requests"] > 0 and c["p99_ms"] for c in connections if c["flood"] is None or c["route"] == "proxy")
    assert "## New connections per second" in report
    for plot in {p for group in PLOTS.values() for p in group}:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


class _Contender:
    name, answers = "synproxy-front", "SYN-ACKs"


def _window(seconds, cpu0, cpu1, sent=0, synacks=0, queue_read=0):
    return {"seconds": seconds, "flood_seconds": seconds, "busy": {0: cpu0, 1: cpu1}, "process": None,
            "legit": {"attempts": 1}, "queue_read": queue_read, "queue_dropped": 0, "bpf": {"front0 x": [5000, 10]},
            "generated": 2 * sent, "sent": sent, "synacks": synacks, "resets": 0, "flood_syns": 0, "flood_acks": 0, "backlog_drops": 0,
            "others": {}}


def test_a_flood_step_is_net_of_its_idle_steps_rates():
    """The idle step (the probe alone) used 0.1 CPU-s/s on each CPU: 10 s of flood are charged 1 s less."""
    idle = _window(5, 0.5, 0.5)
    loaded = _window(10, 6.0, 3.0, sent=100_000, synacks=100_000)
    step = figures(_Contender(), "syn", 20_000, 0, idle, loaded)
    assert not step["noisy_idle"] and not step["other_load"]
    assert step["contender_cpu_seconds"] == 2.0 and step["generator_cpu_seconds"] == 5.0
    assert step["cpu_us_per_answer"] == 20.0 and step["generator_cpu_us_per_packet"] == 50.0
    assert step["sent_share"] == 0.5 and step["short_of_nominal"]
    assert step["bpf"] == {"front0 x": {"runs": 10, "ns_per_run": 500}}
    # Other sessions' processes used 1.5 CPU-s on the contender's CPU during the flood: flagged, and
    # not charged to the contender.
    step = figures(_Contender(), "syn", 20_000, 0, idle, {**loaded, "others": {1: 1.5}})
    assert step["other_load"] and step["contender_cpu_seconds"] == 0.5
    assert step["contender_cpu_seconds_with_others"] == 2.0 and step["generator_cpu_seconds"] == 5.0


def test_the_sink_share_and_the_ratios_per_repetition(monkeypatch):
    def step(name, repetition, rate, cpu, sent, answered):
        return {"scenario": "syn", "contender": name, "repetition": repetition, "offered_pps": rate,
                "contender_cpu_seconds": cpu, "sent": sent, "answered": answered, "sent_pps": sent,
                "answered_pps": answered, "sent_share": None, "cpu_us_per_answer": 1e6 * cpu / answered,
                "cpu_us_per_packet": 1e6 * cpu / sent, "process_us_per_answer": None, "flood_syns_at_backend": 0,
                "legit": {"attempts": 1, "completed": 1, "connect_p99_ms": 1.0}, "bpf": {}}
    steps = [step("sink", 0, 10, 0.1, 100_000, 100_000), step("a", 0, 10, 0.3, 100_000, 100_000),
             step("b", 0, 10, 0.5, 100_000, 100_000), step("sink", 1, 10, 0.2, 100_000, 100_000),
             step("a", 1, 10, 0.4, 100_000, 100_000), step("b", 1, 10, 0.1, 100_000, 100_000)]
    add_sink_share(steps)
    assert [s["cpu_us_per_answer_over_sink"] for s in steps] == [0.0, 2.0, 4.0, 0.0, 2.0, -1.0]
    results = {"repetitions": 2, "contenders": {"sink": "", "a": "", "b": ""}, "steps": steps}
    summary = summarise(results)
    assert summary["a"]["cpu_us_paced_over_sink"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 2}
    # Repetition 1's b cost is negative (noise): only repetition 0 gives a ratio, 2 / 4.
    monkeypatch.setattr(report, "OURS", ("a",))
    monkeypatch.setattr(report, "THEIRS", ("b",))
    rows = {r["what"]: r["ratio"] for r in ratios(results, summary)}
    assert rows["contender-CPU µs per SYN at paced rates, over the sink"] == {
        "median": 0.5, "min": 0.5, "max": 0.5, "n": 1}


def test_spread_and_rotation():
    assert spread([3, None, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert spread([None]) is None
    assert [rotated(["a", "b", "c"], turn) for turn in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_floods_are_syns_acks_with_random_cookies_or_both():
    syn, ack, mixed = (trafgen_config("02:00:00:00:00:02", "198.19.0.10", 80, flood) for flood in ("syn", "ack", "mixed"))
    assert syn.count("{") == ack.count("{") == 1 and mixed.count("{") == 2
    assert "c16(0x8002)" in syn and "c16(52)" in syn
    # An ACK: data offset 5, flags ACK, random sequence and acknowledgment numbers (so a random cookie).
    assert "c16(0x5010)" in ack and "c16(40)" in ack and "drnd(4), drnd(4)" in ack
    assert mixed == syn + ack


def test_the_router_paces_and_counts_what_it_delivers():
    """trafgen always runs flat out; the router's token bucket sets the offered rate (0: no limit)."""
    paced, unpaced = pacer(20_000, "attacker"), pacer(0, "attacker")
    assert "iifname attacker limit rate over 20000/second burst 64 packets drop" in paced
    assert "limit" not in unpaced
    # The counter comes after the limit: it counts what the contender gets, not what trafgen sent.
    assert paced.index("limit rate") < paced.index("counter name delivered")
    assert "counter name delivered" in unpaced


def test_packets_read_leaves_out_what_the_reader_never_got():
    """An overflowing queue: the kernel numbers only packets that fit (the CI run that counted its
    overflow drops against the numbered ones reported a negative count)."""
    before = {"id_sequence": 1000, "dropped": 5, "user_dropped": 2, "length": 0}
    after = {"id_sequence": 37000, "dropped": 60000, "user_dropped": 12, "length": 40}
    assert packets_read(before, after) == 36000 - 10 - 40


def test_rates_and_scenarios_parse_and_bad_ones_are_refused():
    assert rate_list("10000, 20000,max") == (10000, 20000, 0)
    for bad in ("fast", "-5", "10,,20", "99999999"):
        with pytest.raises(Exception, match="packets/s"):
            rate_list(bad)
    assert scenario_list("upload,syn") == ("syn", "upload")
    with pytest.raises(Exception, match="unknown scenario 'nope'"):
        scenario_list("syn,nope")


@pytest.mark.parametrize("arguments, message", [
    (["--rates", "fast"], "packets/s"),
    (["--scenarios", "syn,nope"], "unknown scenario 'nope'"),
    (["--seconds", "0.1"], "--seconds"),
    (["--repetitions", "0"], "--repetitions"),
    (["--contenders", "synproxy-front,nope"], "unknown contender 'nope'"),
])
def test_bad_bench_arguments_exit_cleanly(arguments, message):
    if arguments[0] in ("--seconds", "--repetitions", "--contenders") and os.geteuid() != 0:
        pytest.skip("the bench checks root before its other arguments")
    done = subprocess.run([sys.executable, "-m", "synproxy.cli", "bench", *arguments],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]  # the error is one line (after argparse's usage)


def test_profile_summary_counts_inclusive_and_own_time(tmp_path):
    raw = tmp_path / "profile.raw"
    raw.write_text("main (a.py:1);loop (a.py:5);handle (h.py:9) 30\nmain (a.py:1);loop (a.py:6) 10\n")
    text = hot_functions(raw)
    assert "40 samples" in text
    assert "100.0   0.0  main" in text and " 75.0  75.0  handle" in text and "100.0  25.0  loop" in text
