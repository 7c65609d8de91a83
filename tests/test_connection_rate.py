"""The connection-rate scenario's arithmetic (benchmarks/connection_rate.py): what it reads from ab, and
the ratios it reports. The scenario itself runs in `synproxy bench --quick` (tests/test_bench.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

from benchmarks import connection_rate, measure
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


class FakeLab:
    """The lab as run_ab reads it: ab's outcome, the kernel's counters and sockets in a namespace (each
    reading of /proc/net/netstat one TCPTimeouts more than the last), and the nodes' logs."""

    def __init__(self, tmp_path: Path, ab: SimpleNamespace):
        self.ab, self.state_dir, self.readings = ab, tmp_path, 0
        self.hosts = [SimpleNamespace(name=name, address=f"198.18.{link}.2")
                      for link, name in enumerate(("client", "front0", "backend0"), start=1)]
        (tmp_path / "logs").mkdir()
        for name in ("front0", "backend0"):
            (tmp_path / "logs" / f"{name}.log").write_text("".join(f'{{"event": "{name} {i}"}}\n' for i in range(30)))

    def run(self, host, argv, **kwargs):
        if argv[0] == "cat":
            self.readings += 1
            netstat = f"TcpExt: TCPTimeouts TW\nTcpExt: {self.readings} 7\nTcp: RtoMin OutRsts\nTcp: 200 0\n"
            return SimpleNamespace(stdout=netstat, stderr="", returncode=0)
        if argv[0] == "ss":
            return SimpleNamespace(stdout=f"FIN-WAIT-1 0 1 198.18.1.2:40000 198.19.0.10:80 in {host} \n",
                                   stderr="", returncode=0)
        return self.ab


def fake_scrape(readings):
    """The nodes' metrics: the backend counts one more TIME_WAIT recycle refused at each reading."""
    def scrape(lab, host, address, port):
        readings[host] = readings.get(host, 0) + 1
        refused = readings[host] if host == "backend0" else 0
        return {("synproxy_backend_packets_total", (("outcome", "time_wait_refused"),)): float(refused),
                ("synproxy_front_up", ()): 1.0, ("python_gc_objects_collected_total", ()): float(readings[host])}
    return scrape


def test_a_run_with_failed_requests_keeps_what_ab_said_of_them(tmp_path, monkeypatch):
    """A reset connection is no abort (ab exits 0) but its message must reach the results."""
    monkeypatch.setattr(connection_rate, "scrape", fake_scrape({}))
    said = "apr_socket_recv: Connection reset by peer (104)\n"
    report = AB_REPORT.replace("Length: 3, Exceptions: 0", "Length: 1, Exceptions: 1").replace("Receive: 0", "Receive: 1")
    lab = FakeLab(tmp_path, SimpleNamespace(stdout=report, stderr=said, returncode=0))
    figures = connection_rate.run_ab(lab, 1, 5.0, False, tmp_path)
    assert not figures["aborted"] and figures["failed_by_kind"]["receive"] == 1
    assert figures["message"] == said.strip()
    assert "evidence" not in figures  # kept for an abort only


def test_an_aborted_step_keeps_what_moved_the_sockets_left_and_the_logs(tmp_path, monkeypatch):
    """Repetition 0's first proxy step of the 2026-11-30 full run gave up after 5 s without an answer, and
    only ab's last line was kept: nothing said where the connection stopped, and six re-runs did not
    repeat it. An aborted step now keeps the counters that moved (front, backend, the client's and the
    backend's kernels), the sockets still held, and the logs' tails."""
    monkeypatch.setattr(connection_rate, "scrape", fake_scrape({}))
    said = "Benchmarking 198.19.0.10 (be patient)\napr_pollset_poll: The timeout specified has expired (70007)\n"
    lab = FakeLab(tmp_path, SimpleNamespace(stdout="", stderr=said, returncode=1))
    figures = connection_rate.run_ab(lab, 1, 5.0, False, tmp_path)
    assert figures["aborted"] and figures["requests"] == 0
    kept = figures["evidence"]
    assert kept["ab_said"] == said.strip().splitlines()
    # Only what moved, per place: the backend's refusal and the kernels' timeouts; the unchanged and the
    # non-synproxy metrics are left out.
    assert kept["moved"] == {
        "backend0 metrics": {"synproxy_backend_packets_total{outcome=time_wait_refused}": 1.0},
        "client kernel": {"TcpExt:TCPTimeouts": 2.0}, "backend0 kernel": {"TcpExt:TCPTimeouts": 2.0}}
    assert kept["sockets"]["client"] == ["FIN-WAIT-1 0 1 198.18.1.2:40000 198.19.0.10:80 in client"]
    assert kept["logs"]["backend0"][-1] == '{"event": "backend0 29"}'
    assert len(kept["logs"]["front0"]) == connection_rate.EVIDENCE_LINES


def test_kernel_counters_read_netstat_and_snmp_pairs():
    text = "TcpExt: SyncookiesSent TW\nTcpExt: 3 9\nIp: Forwarding DefaultTTL\nIp: 1 64\n"
    assert connection_rate.kernel_counters(text) == {"TcpExt:SyncookiesSent": 3.0, "TcpExt:TW": 9.0,
                                                     "Ip:Forwarding": 1.0, "Ip:DefaultTTL": 64.0}
    assert connection_rate.moved({"a": {"x": 1.0}}, {"a": {"x": 1.0, "y": 2.0}, "b": {"x": 5.0}}) == {"a": {"y": 2.0}}


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


def test_the_idle_steps_run_without_rps_and_the_floods_with_it(tmp_path, monkeypatch):
    """Without a flood every frame comes from the contender CPU, where RPS would move it anyway: it only adds a
    backlog behind the farm link's poll, on the proxy's route alone. The floods keep the bench's steering (their
    frames come from the generator CPU), and the route leaves it as it found it."""
    steering = {("backend0", "farm"): 1, ("backend0", "eth0"): 1, ("front0", "eth0"): 1}
    seen = []

    class Route:
        def enter(self, lab):
            pass

        def leave(self, lab):
            pass

        def pid(self, lab):
            return None

    monkeypatch.setattr(connection_rate, "ROUTES", {"proxy": Route})
    monkeypatch.setattr(measure, "steer_receive",
                        lambda namespace, interface, cpu: steering.__setitem__((namespace, interface), cpu))
    monkeypatch.setattr(connection_rate, "pin_process", lambda pid, cpu: None)
    monkeypatch.setattr(connection_rate, "process_tree", lambda pid: [])
    monkeypatch.setattr(connection_rate, "flooding", lambda bench, flood: contextlib.nullcontext())
    monkeypatch.setattr(connection_rate, "run_ab", lambda lab, concurrency, seconds, keepalive, work_dir:
                        seen.append(set(steering.values())) or {"seconds": 1.0})
    lab = SimpleNamespace(ns=lambda host: host, pid=lambda name: None)
    bench = SimpleNamespace(lab=lab, work_dir=tmp_path, steered=list(steering), delivered=lambda: 0)
    runs = connection_rate.measure_route(bench, "proxy", 0, 1.0, False)
    idle = [steered for run, steered in zip(runs, seen) if run["flood"] is None]
    flooded = [steered for run, steered in zip(runs, seen) if run["flood"] is not None]
    assert len(idle) == 2 * len(connection_rate.CONCURRENCY) and idle == [{None}] * len(idle)
    assert len(flooded) == len(connection_rate.FLOODS) and flooded == [{connection_rate.CONTENDER_CPU}] * len(flooded)
    assert set(steering.values()) == {connection_rate.CONTENDER_CPU}
