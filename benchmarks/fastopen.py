"""The TCP Fast Open scenario (issue 15): an HTTP request's time to first byte through the default front
to nginx on backend0 (its listener `fastopen=`), with a plain handshake, on the connection that learns
the TFO cookie, and with TFO (the request in the SYN), in round trips from a packet trace on the client
and in milliseconds (synproxy/lab/first_byte.py, as tests/test_tfo_lab.py counts them).

Each round flushes the client's cookie cache, then makes the three requests in the same order (first,
tfo, plain), one at a time from its own source port: the lab's round trip is a fraction of a
millisecond, so the count is the figure the design changes, and the time shows what a round trip
costs here.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.connection_rate import DefaultFront, _cell
from benchmarks.contenders import BACKEND
from benchmarks.measure import CONTENDER_CPU, pin_process, process_tree
from benchmarks.report import append_scenario, spread
from synproxy.lab.first_byte import data_in_syn, round_trips_to_first_byte, traced_request

KINDS = {"first": True, "tfo": True, "plain": False}  # the order within a round; TCP_FASTOPEN_CONNECT or not
REQUESTS, QUICK_REQUESTS = 30, 5                      # rounds per repetition
# Source ports above the kernel's ephemeral range (ab's) and the probe's (harness.PROBE_PORTS), one per
# request, none reused within a run (a reused 4-tuple meets the backend's TIME_WAIT: docs/backend.md).
PORTS = range(61000, 65536)


def measure(bench, repetition: int, quick: bool) -> list[dict]:
    lab = bench.lab
    rounds = QUICK_REQUESTS if quick else REQUESTS
    route = DefaultFront()
    route.enter(lab)
    try:
        for pid in (route.pid(lab), lab.pid(BACKEND), *process_tree(lab.pid(f"{BACKEND}-nginx"))):
            pin_process(pid, CONTENDER_CPU)
        requests = []
        for number in range(rounds):
            lab.run("client", ["ip", "tcp_metrics", "flush", "all"])
            for index, (kind, fastopen) in enumerate(KINDS.items()):
                port = PORTS.start + (repetition * rounds + number) * len(KINDS) + index
                if port >= PORTS.stop:
                    raise ValueError(f"tfo scenario: more than {len(PORTS)} requests")
                request = traced_request(lab, fastopen, port)
                requests.append({"scenario": "tfo", "repetition": repetition, "kind": kind,
                                 "round_trips": round_trips_to_first_byte(request.trace),
                                 "data_in_syn": data_in_syn(request.trace),
                                 "connect_ms": round(1e3 * request.connect_seconds, 3),
                                 "first_byte_ms": round(1e3 * request.first_byte_seconds, 3)})
    finally:
        route.leave(lab)
    return requests


def summarise(requests: list[dict]) -> dict:
    """Per kind: round trips and time to first byte, median [min–max] over every request; and the ratio
    of the medians tfo / plain and first / plain within each repetition."""
    rows = []
    for kind in KINDS:
        mine = [r for r in requests if r["kind"] == kind]
        rows.append({"kind": kind, "requests": len(mine), "data_in_syn": sum(r["data_in_syn"] for r in mine),
                     "round_trips": spread([r["round_trips"] for r in mine]),
                     "connect_ms": spread([r["connect_ms"] for r in mine]),
                     "first_byte_ms": spread([r["first_byte_ms"] for r in mine])})

    def median_ms(kind: str, repetition: int) -> float | None:
        figure = spread([r["first_byte_ms"] for r in requests if r["kind"] == kind and r["repetition"] == repetition])
        return figure["median"] if figure else None

    repetitions = sorted({r["repetition"] for r in requests})
    ratios = {}
    for kind in ("tfo", "first"):
        pairs = [(median_ms(kind, rep), median_ms("plain", rep)) for rep in repetitions]
        ratios[kind] = spread([round(a / b, 3) if a is not None and b else None for a, b in pairs])
    return {"rows": rows, "over_plain": ratios}


def markdown(summary: dict) -> str:
    lines = ["## TCP Fast Open: time to first byte (an HTTP GET of 1 KiB from nginx on backend0)", "",
             ("Through the default front. Round trips from a packet trace on the client; time from connect() "
              "to the answer's first byte (connect() alone: the handshake's round trip, none with TFO). "
              "Median [min–max] over every request."), "",
             "| connection | requests | request in the SYN | round trips | connect() ms | first byte ms |",
             "|---|---:|---:|---:|---:|---:|"]
    names = {"plain": "plain handshake", "first": "first (learns the cookie)", "tfo": "TFO (cookie cached)"}
    lines += [f"| {names[r['kind']]} | {r['requests']} | {r['data_in_syn']} | {_cell(r['round_trips'])} | "
              f"{_cell(r['connect_ms'], 3)} | {_cell(r['first_byte_ms'], 3)} |" for r in summary["rows"]]
    lines += ["", "| median first byte / plain's (per repetition) | ratio |", "|---|---:|"]
    lines += [f"| {names[kind]} | {_cell(ratio, 2)}× |" for kind, ratio in summary["over_plain"].items()]
    return "\n".join(lines) + "\n"


def append_report(results: dict, output: Path) -> None:
    """The scenario's section at the end of results.md, its summary in fastopen.json."""
    if results.get("fastopen"):
        summary = summarise(results["fastopen"])
        append_scenario(output, "fastopen", summary, markdown(summary))
