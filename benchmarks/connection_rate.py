"""The connection-rate scenario (issue 17): the number users measure first, with a real load generator.

ApacheBench (`ab`, Debian's apache2-utils) asks nginx on backend0 for a 1 KiB body, a new connection
per request (and then with keep-alive), at increasing concurrency, through the default front (the
lab's `front.data_plane: auto`, XDP) and straight to the same nginx (the bypass: the router sends the
VIP to backend0, whose listener answers with the kernel's SYN cookies; contenders.KernelSyncookies).
Then the same new-connection load while trafgen floods SYNs, then ACKs, unpaced. Why ab: its latency
is the whole request, connect included (wrk starts its clock after the connect, and h2load gives no
percentiles), it opens a new connection per request unless told `-k`, its `-e` percentiles have
microsecond resolution, and it is one process on one CPU, which is what this machine can spare.

Where things run: ab, nginx and the backend on the contender CPU (the lab's routing and the front's
XDP program for legitimate packets run in the sender's context, so there too); trafgen on the
generator CPU, with the router's and the front's work on the flood it sends. So an idle figure is
what one CPU does for client, proxy and server together, and a flood costs the legitimate traffic what
reaches its CPU or the front's shared receive ring.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from benchmarks.contenders import BACKEND, FRONT, PORT, Front, KernelSyncookies, lab_host, nft
from benchmarks.generator import PACER_TABLE, GeneratorError, pacer, trafgen_argv
from benchmarks.measure import CONTENDER_CPU, GENERATOR_CPU, pin_process, process_tree, receive_steered
from benchmarks.report import append_scenario, spread
from synproxy.lab.topology import BACKEND_METRICS_PORT, FRONT_METRICS_PORT, VIP, Lab, scrape

LOAD_GENERATOR = "ab"
DOCUMENT = "/1k"                  # a static body (synproxy/lab/nginx.py): every answer the same length
CONCURRENCY, QUICK_CONCURRENCY = (1, 8, 32, 128), (16,)
FLOOD_CONCURRENCY = 32
FLOODS = ("syn", "ack")           # each unpaced, with new connections at the flood concurrency
REQUEST_TIMEOUT_SECONDS = 5       # ab -s: a lost SYN and its retransmits at 1 and 3 s still count
MIN_SECONDS = 1.0
# What an aborted step keeps (evidence()): the sockets ab's client and the backend still hold, and the tails
# of the front's and the backend's logs, each at most this many lines.
EVIDENCE_LINES = 20


class DefaultFront(Front):
    name = "synproxy-front-default"
    description = "`synproxy front` with the default `front.data_plane: auto` (XDP here)"

    def enter(self, lab: Lab) -> None:
        """Started with its receive poll unthreaded: the XDP program then runs where each frame was sent
        (the flood's on the generator CPU, the clients' on theirs), the layout the figures in
        benchmarks/README.md were measured in. A threaded poll (which outlives the program that needed
        it) would be one thread for both."""
        lab.start_front(FRONT, data_plane="auto")
        lab.run(FRONT, ["sh", "-c", "echo 0 > /sys/class/net/eth0/threaded"], check=False)


ROUTES = {"proxy": DefaultFront, "bypass": KernelSyncookies}


def ab_argv(concurrency: int, seconds: float, keepalive: bool, percentiles: Path) -> list[str]:
    """ab for ``seconds`` (the request count only bounds it: -n after -t overrides -t's 50000). -v 1: with -r,
    ab names a failed receive (e.g. a connection reset) only from verbosity 1 on, and prints nothing more."""
    return ["taskset", "-c", str(CONTENDER_CPU), LOAD_GENERATOR, "-q", "-r", "-v", "1", "-s", str(REQUEST_TIMEOUT_SECONDS),
            "-t", str(max(1, round(seconds))), "-n", "10000000", "-c", str(concurrency), "-e", str(percentiles),
            *(["-k"] if keepalive else []), f"http://{VIP}:{PORT}{DOCUMENT}"]


def parse_ab(report: str, percentiles: str) -> dict:
    """ab's report and its `-e` CSV: requests completed, failures, each kind's count (connect, receive,
    length, exceptions) and non-2xx answers, requests/s, and the p50/p99 of the whole request, connect
    included."""
    def number(label: str) -> float:
        found = re.search(rf"^{label}:\s+([\d.]+)", report, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    served = dict(line.split(",") for line in percentiles.splitlines()[1:] if line.count(",") == 1)
    requests = int(number("Complete requests"))

    def percentile(share: int) -> float | None:
        # ab reads its sorted times at index int(0.5 + requests * share / 100), past the end (a 0) when
        # fewer than 50 requests completed for the 99th: no figure rather than that one.
        if str(share) not in served or int(0.5 + requests * share / 100) >= requests:
            return None
        return float(served[str(share)])

    # ab's breakdown of its failures, kept so a failed step says which kind it met.
    kinds = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", report)
    failed_by_kind = dict(zip(("connect", "receive", "length", "exceptions"),
                              map(int, kinds.groups()) if kinds else (0, 0, 0, 0)))
    return {"requests": requests, "failed": int(number("Failed requests")), "failed_by_kind": failed_by_kind,
            "non_2xx": int(number("Non-2xx responses")), "seconds": number("Time taken for tests"),
            "requests_per_second": number("Requests per second"), "p50_ms": percentile(50), "p99_ms": percentile(99)}


def run_ab(lab: Lab, concurrency: int, seconds: float, keepalive: bool, work_dir: Path) -> dict:
    percentiles = work_dir / "ab-percentiles.csv"
    percentiles.unlink(missing_ok=True)
    before = counters(lab)
    done = lab.run("client", ab_argv(concurrency, seconds, keepalive, percentiles), check=False,
                   timeout=seconds + 4 * REQUEST_TIMEOUT_SECONDS + 30)
    figures = parse_ab(done.stdout, percentiles.read_text() if percentiles.exists() else "")
    # ab gives up on the whole run when no socket moves for -s seconds; what it served counts, the rest fails.
    figures["aborted"] = done.returncode != 0
    figures["errors"] = figures["failed"] + figures["non_2xx"] + (1 if figures["aborted"] else 0)
    # What ab said of its failures (a reset: "apr_socket_recv: Connection reset by peer (104)"; one reset
    # counts as a receive, a length and an exception failure in its report), or why it gave up.
    if figures["aborted"] or figures["failed"]:
        figures["message"] = (done.stderr.strip().splitlines() or [""])[-1][:200]
    if figures["aborted"]:
        figures["evidence"] = evidence(lab, before, done.stderr)
    return figures


def counters(lab: Lab) -> dict[str, dict[str, float]]:
    """Every counter an aborted step can be read by, per place: the front's and the backend's metrics
    (synproxy_*: the data planes' outcomes, e.g. a TIME_WAIT recycle refused or a packet no connection owns)
    and the kernel's TCP and IP counters (/proc/net/netstat and snmp) where ab and nginx run. Read before
    every step (a few ms); a node that is not running (the bypass stops both) is left out."""
    places: dict[str, dict[str, float]] = {}
    for name, port in ((FRONT, FRONT_METRICS_PORT), (BACKEND, BACKEND_METRICS_PORT)):
        with contextlib.suppress(OSError, ValueError):
            places[f"{name} metrics"] = {
                metric + "{" + ",".join(f"{key}={value}" for key, value in labels) + "}": value
                for (metric, labels), value in scrape(lab, name, lab_host(lab, name).address, port).items()
                if metric.startswith("synproxy_")}
    for host in ("client", BACKEND):
        done = lab.run(host, ["cat", "/proc/net/netstat", "/proc/net/snmp"], check=False)
        places[f"{host} kernel"] = kernel_counters(done.stdout)
    return places


def kernel_counters(text: str) -> dict[str, float]:
    """/proc/net/netstat and /proc/net/snmp: each group is a line of names and a line of values
    ("TcpExt: SyncookiesSent ..." then "TcpExt: 0 ..."), read as {"TcpExt:SyncookiesSent": 0, ...}."""
    lines = text.splitlines()
    found = {}
    for names, values in zip(lines[0::2], lines[1::2]):
        group, *names = names.split()
        for name, value in zip(names, values.split()[1:]):
            with contextlib.suppress(ValueError):
                found[group + name] = float(value)
    return found


def moved(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per place, the counters that changed between two readings (a place read only once: left out)."""
    return {place: changed for place, values in after.items() if place in before
            if (changed := {name: value - before[place].get(name, 0.0) for name, value in values.items()
                            if value != before[place].get(name, 0.0)})}


def evidence(lab: Lab, before: dict[str, dict[str, float]], ab_said: str) -> dict:
    """What an aborted step leaves to read, gathered at once (cheap, bounded): what ab said, the counters
    that moved during the step, the sockets the client and the backend still hold other than listeners
    and TIME_WAIT (ab's stalled connection, if its close left it in FIN_WAIT or the backend still has
    it; a SYN_SENT one is gone with ab), and the front's and backend's log tails. The one abort met so far
    (repetition 0's first proxy step, 2026-11-30) left only ab's message, and six re-runs did not repeat it."""
    sockets = {}
    for host in ("client", BACKEND):
        listing = lab.run(host, ["ss", "-Htanoi", "exclude", "listening", "exclude", "time-wait"], check=False).stdout
        sockets[host] = [line.rstrip() for line in listing.splitlines()[:EVIDENCE_LINES]]
    logs = {}
    for name in (FRONT, BACKEND):
        path = lab.state_dir / "logs" / f"{name}.log"
        if path.exists():
            logs[name] = path.read_text(errors="replace").splitlines()[-EVIDENCE_LINES:]
    return {"ab_said": ab_said.strip().splitlines()[-EVIDENCE_LINES:], "moved": moved(before, counters(lab)),
            "sockets": sockets, "logs": logs}


@contextlib.contextmanager
def unsteered(bench) -> Iterator[None]:
    """The kernel's default receive path (no RPS) on the lab's interfaces for the block, the bench's steering
    onto the contender CPU again after it. Without a flood every frame is sent from the contender CPU, so each
    veth's receive (the backlog a plain veth queues on, or the poll a native XDP program runs in, scheduled by
    the send) is on that CPU already and RPS moves nothing. It only adds a step on the proxy's route: the farm
    link's poll, where the backend's XDP stage builds each frame into an skb, hands it to the CPU's backlog
    instead of the stack, a second queue on the same CPU that a NIC's poll does not take (the bypass's veth
    queues on the backlog either way). Measured in one lab: 1.03x [1.01-1.12] the proxy's requests/s without it (5 rounds);
    the bench's own A/B could not tell it from its noise (benchmarks/README.md, "Connection rate"). The floods
    stay steered: their frames come from the generator CPU."""
    with contextlib.ExitStack() as steering:
        for host, interface in bench.steered:
            steering.enter_context(receive_steered(bench.lab.ns(host), interface, None, after=CONTENDER_CPU))
        yield


@contextlib.contextmanager
def flooding(bench, flood: str) -> Iterator[None]:
    """trafgen sending ``flood`` unpaced (the router's pacer removed) until the block ends."""
    from benchmarks.harness import stop_group

    nft(bench.lab, "router", f"add table inet {PACER_TABLE}\ndelete table inet {PACER_TABLE}\n" + pacer(0, "attacker"))
    generator = bench.lab.popen("attacker", trafgen_argv(bench.trafgen_configs[flood], "eth0", GENERATOR_CPU),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        bench._wait_for_flood(generator)
        yield
    finally:
        stop_group(generator)


def measure(bench, repetition: int, seconds: float, quick: bool) -> list[dict]:
    """Both routes, each through every load mode and concurrency and then the floods (one repetition);
    the route that goes first alternates."""
    if shutil.which(LOAD_GENERATOR) is None:
        raise GeneratorError(f"{LOAD_GENERATOR} not found: install Debian's apache2-utils (deploy/install-deps.sh)")
    names = list(ROUTES)
    # The client sends complete checksums, as from a wire, on both routes alike (the bench's lab is built
    # with front.data_plane auto, which turns its transmit checksum offload off; docs/front.md).
    # bpf_stats off (the bench's hold let go, as for a timed upload): with it on every program run reads
    # the clock twice, which only the proxy's route pays (four programs per packet), and the scenario
    # reads no program's figures. Measured: 7-8 % fewer requests/s through the proxy with it on
    # (benchmarks/README.md, "Where a forwarded packet's time goes").
    with bench.stats.paused():
        return [run for name in names[repetition % 2:] + names[:repetition % 2]
                for run in measure_route(bench, name, repetition, max(MIN_SECONDS, seconds), quick)]


def measure_route(bench, route_name: str, repetition: int, seconds: float, quick: bool) -> list[dict]:
    lab = bench.lab
    levels = QUICK_CONCURRENCY if quick else CONCURRENCY
    flood_level = levels[-1] if quick else FLOOD_CONCURRENCY
    common = {"scenario": "connections", "route": route_name, "repetition": repetition}
    runs = []
    route = ROUTES[route_name]()
    route.enter(lab)
    try:
        for pid in (route.pid(lab), lab.pid(BACKEND), *process_tree(lab.pid(f"{BACKEND}-nginx"))):
            pin_process(pid, CONTENDER_CPU)
        with unsteered(bench):
            for keepalive in (False, True):
                for concurrency in levels:
                    runs.append({**common, "mode": "keepalive" if keepalive else "new", "concurrency": concurrency,
                                 "flood": None, **run_ab(lab, concurrency, seconds, keepalive, bench.work_dir)})
        for flood in FLOODS:
            with flooding(bench, flood):
                before = bench.delivered()
                figures = run_ab(lab, flood_level, seconds, False, bench.work_dir)
                delivered = bench.delivered() - before
            runs.append({**common, "mode": "new", "concurrency": flood_level, "flood": flood,
                         "flood_pps": round(delivered / figures["seconds"]) if figures["seconds"] else None,
                         **figures})
    finally:
        route.leave(lab)
    return runs


def summarise(runs: list[dict]) -> dict:
    """Median [min–max] over the repetitions of every (route, mode, concurrency, flood), and the ratios
    taken within each repetition: proxy / bypass (requests/s, p99), and under each flood / idle."""
    keys = list(dict.fromkeys((r["route"], r["mode"], r["concurrency"], r["flood"]) for r in runs))
    by_key = {key: {r["repetition"]: r for r in runs if (r["route"], r["mode"], r["concurrency"], r["flood"]) == key}
              for key in keys}
    rows = [{"route": route, "mode": mode, "concurrency": concurrency, "flood": flood,
             **{figure: spread([r.get(figure) for r in by_key[route, mode, concurrency, flood].values()])
                for figure in ("requests_per_second", "p50_ms", "p99_ms", "flood_pps")},
             "errors": sum(r["errors"] for r in by_key[route, mode, concurrency, flood].values()),
             "requests": sum(r["requests"] for r in by_key[route, mode, concurrency, flood].values())}
            for route, mode, concurrency, flood in keys]

    def ratio(numerator: tuple, denominator: tuple, figure: str) -> dict | None:
        pairs = [(r.get(figure), by_key.get(denominator, {}).get(rep, {}).get(figure))
                 for rep, r in by_key.get(numerator, {}).items()]
        return spread([round(a / b, 3) if a is not None and b else None for a, b in pairs])

    ratios = [{"what": f"{mode}, concurrency {concurrency}", "mode": mode, "concurrency": concurrency,
               "requests_per_second": ratio(("proxy", mode, concurrency, None), ("bypass", mode, concurrency, None),
                                            "requests_per_second"),
               "p99": ratio(("proxy", mode, concurrency, None), ("bypass", mode, concurrency, None), "p99_ms")}
              for route, mode, concurrency, flood in keys if route == "proxy" and flood is None]
    under_flood = [{"route": route, "flood": flood, "concurrency": concurrency,
                    "of_idle": ratio((route, "new", concurrency, flood), (route, "new", concurrency, None),
                                     "requests_per_second")}
                   for route, mode, concurrency, flood in keys if flood is not None]
    return {"rows": rows, "proxy_over_bypass": ratios, "under_flood": under_flood}


def _cell(figure: dict | None, digits: int = 0) -> str:
    if figure is None:
        return "–"
    if figure["min"] == figure["max"]:
        return f"{figure['median']:.{digits}f}"
    return f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}–{figure['max']:.{digits}f}]"


def markdown(summary: dict) -> str:
    lines = ["## New connections per second (ab, a 1 KiB body from nginx on backend0)", "",
             ("proxy: the default front (`front.data_plane: auto`); bypass: the router sends the VIP to backend0 "
              "(kernel SYN cookies). Median [min–max] over the repetitions; errors summed over them."), "",
             "| route | connections | concurrency | flood | flood packets/s | requests/s | p50 ms | p99 ms | errors |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['route']} | {'new per request' if r['mode'] == 'new' else 'keep-alive'} | {r['concurrency']} | "
              f"{r['flood'] or '–'} | {_cell(r['flood_pps'])} | {_cell(r['requests_per_second'])} | "
              f"{_cell(r['p50_ms'], 2)} | {_cell(r['p99_ms'], 2)} | {r['errors']} |" for r in summary["rows"]]
    lines += ["", "| proxy / bypass | requests/s | p99 |", "|---|---:|---:|"]
    lines += [f"| {r['what']} | {_cell(r['requests_per_second'], 2)}× | {_cell(r['p99'], 2)}× |"
              for r in summary["proxy_over_bypass"]]
    lines += ["", "| under flood / idle (new connections) | requests/s |", "|---|---:|"]
    lines += [f"| {r['route']}, {r['flood']} flood, concurrency {r['concurrency']} | {_cell(r['of_idle'], 2)}× |"
              for r in summary["under_flood"]]
    return "\n".join(lines) + "\n"


def append_report(results: dict, output: Path) -> None:
    """The scenario's section at the end of results.md, its summary in connections.json."""
    if results.get("connections"):
        summary = summarise(results["connections"])
        append_scenario(output, "connections", summary, markdown(summary))
