"""The connection-rate scenario's arithmetic (benchmarks/connection_rate.py): what it reads from ab, and
the ratios it reports. The scenario itself runs in `synproxy bench --quick` (tests/test_bench.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

from benchmarks import connection_rate
from benchmarks.connection_rate import ab_argv, markdown, parse_ab, summarise

# ab 2.3's report (Debian's apache2-utils), trimmed, from a run against the lab's nginx.
AB_REPORT = """\
Concurrency Level:      16
Time taken for tests:   2.001 seconds
Complete requests:      13434
Failed requests:        3
   (Connect: 0, Receive: 0, Length: 3, Exceptions: 0)
Non-2xx responses:      2
Total transferred:      17329860 bytes
Requests per second:    6712.71 [#/sec] (mean)
Time per request:       2.384 [ms] (mean)
"""
AB_PERCENTILES = "Percentage served,Time in ms\n" + "".join(f"{i},{i / 10:.3f}\n" for i in range(101))


def test_ab_figures_are_its_counts_rate_and_microsecond_percentiles():
    assert parse_ab(AB_REPORT, AB_PERCENTILES) == {
        "requests": 13434, "failed": 3,
        "failed_by_kind": {"connect": 0, "receive": 0, "length": 3, "exceptions": 0}, "non_2xx": 2, "seconds": 2.001, "requests_per_second": 6712.71,
        "p50_ms": 5.0, "p99_ms": 9.9}
    # 43 requests: ab's 99th percentile reads past its sorted times (a 0 in its CSV): left out.
    few = parse_ab(AB_REPORT.replace("13434", "43"), AB_PERCENTILES.replace("99,9.900", "99,0.000"))
    assert few["p50_ms"] == 5.0 and few["p99_ms"] is None
    # A run that served nothing (ab gave up): no percentiles, no rate.
    empty = parse_ab("", "")
    assert empty["requests"] == 0 and empty["p99_ms"] is None and empty["requests_per_second"] == 0.0


def test_ab_opens_a_new_connection_per_request_unless_asked_for_keepalive():
    new, kept = (ab_argv(32, 5, keepalive, Path("p.csv")) for keepalive in (False, True))
    new = new[new.index("ab"):]  # after taskset's own options
    assert "-k" not in new and "-k" in kept
    assert new[new.index("-c") + 1] == "32" and new[new.index("-t") + 1] == "5"
    # -n after -t: ab's -t alone stops at 50000 requests.
    assert new.index("-n") > new.index("-t")
    # -r goes on past a failed receive, which ab names only from verbosity 1 on.
    assert "-r" in new and new[new.index("-v") + 1] == "1"


def test_a_run_with_failed_requests_keeps_what_ab_said_of_them(tmp_path):
    """A reset connection is no abort (ab exits 0) but its message must reach the results."""
    said = "apr_socket_recv: Connection reset by peer (104)\n"
    report = AB_REPORT.replace("Length: 3, Exceptions: 0", "Length: 1, Exceptions: 1").replace("Receive: 0", "Receive: 1")
    done = SimpleNamespace(stdout=report, stderr=said, returncode=0)
    lab = SimpleNamespace(run=lambda *args, **kwargs: done)
    figures = connection_rate.run_ab(lab, 1, 5.0, False, tmp_path)
    assert not figures["aborted"] and figures["failed_by_kind"]["receive"] == 1
    assert figures["message"] == said.strip()


def _run(route, repetition, rps, p99, mode="new", concurrency=8, flood=None, errors=0):
    return {"route": route, "repetition": repetition, "mode": mode, "concurrency": concurrency, "flood": flood,
            "requests_per_second": rps, "p50_ms": p99 / 2, "p99_ms": p99, "flood_pps": 1000 if flood else None,
            "errors": errors, "requests": 100}


def test_ratios_are_taken_within_a_repetition():
    runs = [_run("proxy", 0, 800, 2.0), _run("bypass", 0, 1000, 1.0),
            _run("proxy", 1, 900, 3.0), _run("bypass", 1, 900, 1.0),
            _run("proxy", 0, 400, 4.0, flood="syn", errors=1), _run("proxy", 1, 900, 4.0, flood="syn")]
    summary = summarise(runs)
    ratio = summary["proxy_over_bypass"][0]
    assert ratio["requests_per_second"] == {"median": 0.9, "min": 0.8, "max": 1.0, "n": 2}
    assert ratio["p99"] == {"median": 2.5, "min": 2.0, "max": 3.0, "n": 2}
    assert summary["under_flood"] == [{"route": "proxy", "flood": "syn", "concurrency": 8,
                                       "of_idle": {"median": 0.75, "min": 0.5, "max": 1.0, "n": 2}}]
    flooded = next(row for row in summary["rows"] if row["flood"] == "syn")
    assert flooded["errors"] == 1 and flooded["requests"] == 200
    text = markdown(summary)
    assert "| new, concurrency 8 | 0.90 [0.80–1.00]× | 2.50 [2.00–3.00]× |" in text
    assert "| proxy, syn flood, concurrency 8 | 0.75 [0.50–1.00]× |" in text


def test_the_routes_are_measured_with_bpf_stats_off(monkeypatch):
    """The bench holds bpf_stats on for its programs' figures; each program run then reads the clock twice,
    which only the proxy's route pays: the scenario lets the hold go while ab runs."""
    stats_on = [True]

    @contextlib.contextmanager
    def paused():
        stats_on[0] = False
        try:
            yield False
        finally:
            stats_on[0] = True

    seen = []
    monkeypatch.setattr(connection_rate.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(connection_rate, "measure_route",
                        lambda bench, name, *args: seen.append((name, stats_on[0])) or [{"route": name}])
    runs = connection_rate.measure(SimpleNamespace(stats=SimpleNamespace(paused=paused)), 0, 5.0, False)
    assert [run["route"] for run in runs] == ["proxy", "bypass"]
    assert seen == [("proxy", False), ("bypass", False)] and stats_on == [True]
