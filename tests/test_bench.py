"""`synproxy bench --quick`: every contender and scenario produces figures (speed is reported, never
asserted), and the method's arithmetic: the idle step's rates subtracted, the sink's share, the order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import fastopen, report
from benchmarks.contenders import ALL
from benchmarks.generator import pacer, trafgen_config
from benchmarks.harness import figures, hot_functions, packets_read, rotated
from benchmarks.options import rate_list, scenario_list
from benchmarks.report import PLOTS, ratios, spread, summarise, targets, verdict
from tests.lab_fixtures import needs_root

SERVING = {"synproxy-front", "synproxy-front-tc", "synproxy-front-nfqueue", "kernel-syncookies", "iptables-synproxy"}


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
        # The sink and the floors only at the top rate (contenders.Contender.top_rate_only).
        assert len(syn) == (2 if name in SERVING else 1), name
        assert all(s["sent"] > 0 and s["answered"] > 0 for s in syn), name
        assert results["summary"][name]["capacity"]["median"] > 0, name
        if name != "sink":
            assert all(s["cpu_us_per_answer"] is not None for s in syn), name
        floods = [s for s in results["steps"] if s["contender"] == name and s["scenario"] in ("ack", "mixed")]
        assert len(floods) == (2 if name in SERVING else 0), name
        assert all("veth_drops" in s for s in syn + floods), name
        # The same probe runs against every contender, in the idle step and the flood step.
        for s in syn + floods:
            assert s["legit"]["attempts"] > 0 and s["idle_legit"]["attempts"] > 0, name
            assert s["idle_seconds"] > 0 and set(s["idle_cpu_per_second"]) == {"0", "1"}, name
            assert s["cpu_us_per_packet"] is not None and s["generator_cpu_us_per_packet"] is not None, name
    # Each front ran the data plane it stands for: the default one native XDP, its receive poll pinned
    # to the contender CPU; its program and the tc one answered the top step's SYNs.
    running = results["running"]
    assert running["synproxy-front"][0]["mode"] == "xdp" and running["synproxy-front"][0]["xdp"] == {"eth0": "native"}
    assert running["synproxy-front"][0]["napi_threads_pinned"] >= 1
    assert running["synproxy-front-tc"][0]["mode"] == "tc" and running["synproxy-front-nfqueue"][0]["mode"] == "nfqueue"
    for name, kind in (("synproxy-front", "xdp"), ("synproxy-front-tc", "tc")):
        top = next(s for s in results["steps"] if s["contender"] == name and s["scenario"] == "syn"
                   and s["offered_pps"] == 0)
        program = max((p for where, p in top["bpf"].items() if where.startswith("front0")), key=lambda p: p["runs"])
        assert program["runs"] > 0 and program["ns_per_run"] > 0, name
    uploads = {u["contender"]: u for u in results["uploads"]}
    assert set(uploads) == SERVING and all(u["bytes"] > 0 and u["mb_per_second"] > 0 for u in uploads.values())
    # The XDP front forwards the upload in the kernel: its program ran for the upload's packets.
    assert max(p["runs"] for where, p in uploads["synproxy-front"]["bpf"].items() if where.startswith("front0")) > 1000
    report = (tmp_path / "results.md").read_text()
    assert "| synproxy-front |" in report and "## Bulk upload" in report and "| ack | synproxy-front" in report
    assert "## The issue's targets" in report and "upload ≥ 50 % of the bypass" in report
    # The connection-rate scenario (benchmarks/connection_rate.py): both routes, both load modes, both floods.
    connections = results["connections"]
    assert {(c["route"], c["mode"], c["flood"]) for c in connections} == {
        *((route, mode, None) for route in ("proxy", "bypass") for mode in ("new", "keepalive")),
        *((route, "new", flood) for route in ("proxy", "bypass") for flood in ("syn", "ack"))}
    assert all(c["requests"] > 0 and c["p99_ms"] for c in connections if c["flood"] is None or c["route"] == "proxy")
    assert "## New connections per second" in report
    # The TFO scenario (benchmarks/fastopen.py): the request in the SYN gets its first byte a round trip sooner.
    tfo = {row["kind"]: row for row in json.loads((tmp_path / "fastopen.json").read_text())["rows"]}
    assert {kind: (row["round_trips"]["min"], row["round_trips"]["max"]) for kind, row in tfo.items()} == {
        "first": (2, 2), "tfo": (1, 1), "plain": (2, 2)}
    assert tfo["tfo"]["data_in_syn"] == tfo["tfo"]["requests"] > 0 and tfo["first"]["data_in_syn"] == 0
    assert all(row["first_byte_ms"]["median"] > 0 for row in tfo.values())
    assert "## TCP Fast Open: time to first byte" in report
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


def _syn_step(name, repetition, rate, cpu, sent, answered, seconds=10.0):
    return {"scenario": "syn", "contender": name, "repetition": repetition, "offered_pps": rate,
            "contender_cpu_seconds": cpu, "seconds": seconds, "sent": sent, "answered": answered, "sent_pps": sent,
            "answered_pps": answered, "sent_share": None, "cpu_us_per_answer": 1e6 * cpu / answered,
            "cpu_us_per_packet": 1e6 * cpu / sent, "process_us_per_answer": None, "flood_syns_at_backend": 0,
            "legit": {"attempts": 1, "completed": 1, "connect_p99_ms": 1.0},
            "idle_legit": {"attempts": 1, "completed": 1, "connect_p99_ms": 1.0}, "bpf": {}}


def test_the_cost_per_syn_is_read_at_the_top_rate_and_the_ratios_per_repetition(monkeypatch):
    """The unpaced step (offered 0) is the top one, whatever the order of the steps."""
    steps = [_syn_step("a", 0, 0, 4.0, 400_000, 400_000), _syn_step("a", 0, 40_000, 9.0, 400_000, 400_000),
             _syn_step("b", 0, 0, 8.0, 400_000, 400_000), _syn_step("a", 1, 0, 6.0, 400_000, 400_000),
             _syn_step("b", 1, 0, -1.0, 400_000, 400_000)]
    results = {"repetitions": 2, "contenders": {"a": "", "b": ""}, "steps": steps}
    summary = summarise(results)
    assert summary["a"]["per_repetition"]["cpu_us_top"] == [10.0, 15.0]
    assert summary["a"]["cpu_busy_top"] == {"median": 0.5, "min": 0.4, "max": 0.6, "n": 2}
    # Repetition 1's b cost is negative (noise): only repetition 0 gives a ratio, 10 / 20.
    monkeypatch.setattr(report, "OURS", ("a",))
    monkeypatch.setattr(report, "THEIRS", ("b",))
    rows = {r["what"]: r["ratio"] for r in ratios(results, summary)}
    assert rows["contender-CPU µs per SYN at the top rate"] == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 1}


def test_targets_are_judged_on_the_default_front_in_every_repetition():
    assert verdict([0.995, 1.0, 0.999], lambda v: v >= 0.99) == "**met**"
    assert verdict([0.98, 1.0, 0.999], lambda v: v >= 0.99) == "median only"
    assert verdict([0.98, 0.97, 1.0], lambda v: v >= 0.99) == "not met"
    assert verdict([None], lambda v: v >= 0.99) == "not measured"
    steps = []
    for repetition in range(2):
        for name, cpu in (("synproxy-front", 2.0), ("kernel-syncookies", 5.0), ("iptables-synproxy", 4.0)):
            steps.append(_syn_step(name, repetition, 0, cpu, 1_000_000, 1_000_000))
            for flood, p99 in (("ack", 3.0), ("mixed", 1.5)):
                steps.append({**_syn_step(name, repetition, 0, cpu, 1_000_000, 1), "scenario": flood,
                              "legit": {"attempts": 100, "completed": 99 + repetition, "connect_p99_ms": p99},
                              "veth_drops": {"router front0": {"tx_dropped": 7}}})
    steps[0]["bpf"] = {"front0 eth0 xdp synproxy_front_": {"runs": 1000, "ns_per_run": 380},
                       "front0 eth0 tc synproxy_front": {"runs": 3, "ns_per_run": 900}}
    uploads = [{"contender": name, "repetition": repetition, "mb_per_second": mb,
                "bpf": {"front0 eth0 xdp synproxy_front_": {"runs": 5000, "ns_per_run": 200}}}
               for repetition in range(2) for name, mb in (("synproxy-front", 600.0), ("kernel-syncookies", 1000.0))]
    results = {"repetitions": 2, "steps": steps, "uploads": uploads,
               "contenders": {"synproxy-front": "", "kernel-syncookies": "", "iptables-synproxy": ""}}
    rows = {row["target"]: row for row in targets(results, summarise(results))}
    assert rows["ACK flood at max: legit success ≥ 99 %"]["verdict"] == "**met**"
    assert rows["ACK flood at max: p99 connect ≤ 2× idle p99"]["verdict"] == "not met"  # 3 ms against 1 ms idle
    assert rows["mixed flood at max: p99 connect ≤ 2× idle p99"]["verdict"] == "**met**"
    assert rows["upload ≥ 50 % of the bypass (same repetition)"]["values"]["synproxy-front"]["median"] == 0.6
    # The program that ran most is the front's: the XDP one, not the tc one behind it.
    per_syn = rows["front program ≤ 400 ns per SYN answered (bpf_stats, SYN flood at max)"]
    assert per_syn["per_repetition"]["synproxy-front"] == [380, None] and per_syn["verdict"] == "**met**"
    assert rows["front program ≤ 150 ns per forwarded packet (bpf_stats, upload)"]["verdict"] == "not met"
    assert rows["CPU per SYN below kernel SYN cookies' (ratio < 1)"]["values"]["synproxy-front"]["median"] == 0.4
    assert rows["CPU per SYN below iptables SYNPROXY's (ratio < 1)"]["verdict"] == "**met**"
    assert rows["frames front0's veth dropped at the SYN / ACK / mixed max steps (both ends)"][
        "per_repetition"]["synproxy-front"] == [14, 14]


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


def test_the_tfo_scenario_summarises_each_kind_and_its_ratio_to_plain():
    """Medians per repetition, then their ratio: tfo 0.3 ms against plain 0.6 ms is 0.5×."""
    requests = [{"repetition": 0, "kind": kind, "round_trips": trips, "data_in_syn": kind == "tfo",
                 "connect_ms": 0.01 if kind == "tfo" else 0.1, "first_byte_ms": ms}
                for kind, trips, times in (("first", 2, (0.7, 0.9)), ("tfo", 1, (0.3, 0.3)), ("plain", 2, (0.5, 0.7)))
                for ms in times]
    summary = fastopen.summarise(requests)
    rows = {row["kind"]: row for row in summary["rows"]}
    assert rows["tfo"]["round_trips"] == {"median": 1, "min": 1, "max": 1, "n": 2} and rows["tfo"]["data_in_syn"] == 2
    assert rows["plain"]["first_byte_ms"]["median"] == 0.6 and rows["first"]["data_in_syn"] == 0
    assert summary["over_plain"]["tfo"]["median"] == 0.5 and summary["over_plain"]["first"]["median"] == 1.333
    assert "| TFO (cookie cached) | 2 | 2 | 1 | 0.010 | 0.300 |" in fastopen.markdown(summary)
