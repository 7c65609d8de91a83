"""The bench's results as JSON, a markdown table with the ratios between contenders, and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

UNSATURATED = 0.9  # a step counts for the per-SYN cost when it answered at least this share of what was sent
PLOTS = ("answered_per_second.png", "cpu_per_syn.png", "legit_connect.png")


def summarise(results: dict) -> dict[str, dict]:
    """Per contender: capacity, CPU µs per answer (median of unsaturated steps), legit clients at the top rate."""
    summary = {}
    for name in results["contenders"]:
        steps = [s for s in results["steps"] if s["contender"] == name]
        costed = [s for s in steps if s["cpu_us_per_answer"] is not None]
        unsaturated = [s for s in costed if s["answered"] >= UNSATURATED * s["sent"]] or costed
        top = max(steps, key=lambda s: s["sent_pps"]) if steps else None
        legit = top["legit"] if top else None
        summary[name] = {
            "capacity_pps": max((s["answered_pps"] for s in steps), default=0),
            "cpu_us": _median(s["cpu_us_per_answer"] for s in unsaturated),
            "process_us": _median(s["process_us_per_answer"] for s in unsaturated),
            "flood_syns_at_backend": sum(s["flood_syns_at_backend"] for s in steps),
            "legit_success": (round(legit["completed"] / legit["attempts"], 3)
                              if legit and legit["attempts"] else None),
            "legit_p99_ms": legit["connect_p99_ms"] if legit else None,
            "top_sent_pps": top["sent_pps"] if top else 0,
        }
    floor = summary.get("nfqueue-floor", {}).get("cpu_us")
    for figures in summary.values():
        figures["cpu_vs_floor"] = round(figures["cpu_us"] / floor, 2) if floor and figures["cpu_us"] else None
    return summary


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _cell(value, suffix: str = "") -> str:
    return "–" if value is None else f"{value}{suffix}"


def markdown(results: dict, summary: dict[str, dict]) -> str:
    machine = results["machine"]
    lines = [
        "# Benchmark results", "",
        (f"{machine['date']}, Linux {machine['kernel']}, {machine['cpus']} CPUs, Python {machine['python']}; "
        f"{results['seconds_per_step']} s per step; the generator (trafgen) pinned to CPU {results['generator_cpu']}. "
        "Method: `benchmarks/README.md`."), "",
        "## Summary", "",
        ("| contender | answers | capacity (answered/s) | CPU µs per answer | × NFQUEUE floor | process µs per answer "
        "| flood SYNs at backend | legit success at top rate | legit p99 connect (ms) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    from benchmarks.contenders import ALL
    answers = {c.name: c.answers for c in ALL}
    for name, s in summary.items():
        success = None if s["legit_success"] is None else f"{100 * s['legit_success']:.1f} %"
        lines.append(f"| {name} | {answers.get(name, '')} | {s['capacity_pps']} | {_cell(s['cpu_us'])} | "
                     f"{_cell(s['cpu_vs_floor'])} | {_cell(s['process_us'])} | {s['flood_syns_at_backend']} | "
                     f"{_cell(success)} | {_cell(s['legit_p99_ms'])} |")
    lines += ["", ratio_lines(results, summary), "", "## Contenders", ""]
    lines += [f"- **{name}**: {text}" for name, text in results["contenders"].items()]
    lines += ["", "## Every step", "",
              ("| contender | offered/s | sent/s | answered/s | queue drops | CPU s | CPU µs/answer "
              "| process µs/answer | flood SYNs at backend | legit ok/attempts | p50 / p99 ms |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results["steps"]:
        legit = s["legit"]
        legit_cells = (f"{legit['completed']}/{legit['attempts']} | {_cell(legit['connect_p50_ms'])} / "
                       f"{_cell(legit['connect_p99_ms'])}" if legit else "– | –")
        lines.append(f"| {s['contender']} | {s['offered_pps'] or 'max'} | {s['sent_pps']} | {s['answered_pps']} | "
                     f"{s['queue_dropped']} | {s['cpu_seconds']} | {_cell(s['cpu_us_per_answer'])} | "
                     f"{_cell(s['process_us_per_answer'])} | {s['flood_syns_at_backend']} | {legit_cells} |")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), ""]
    return "\n".join(lines)


def matched_ratio(results: dict, ours: str, theirs: str, key: str) -> tuple[list[int], float] | None:
    """A per-answer cost, ours / theirs: the median of the ratios at the paced rates both answered
    unsaturated (the same offered load), and those rates. A median, because one step's figure can be
    far off: net of the generator's share, a cheap contender's cost at a high rate is a small
    difference of two large numbers."""
    def unsaturated(name: str) -> dict[int, float]:
        return {s["offered_pps"]: s[key] for s in results["steps"]
                if s["contender"] == name and s[key] and s["answered"] >= UNSATURATED * s["sent"]}
    mine, other = unsaturated(ours), unsaturated(theirs)
    common = sorted(rate for rate in mine if rate in other and rate)
    if not common:
        return None
    return common, statistics.median(mine[rate] / other[rate] for rate in common)


# Per front contender, what to set it against. The NFQUEUE front against the floors by both processes'
# own CPU (the machine-wide figure of a 7 µs consumer drowns in the generator's share); everything else,
# and the fast path (whose SYNs cost no process time at all), by the machine's.
COMPARISONS = {
    "synproxy-front": (("nfqueue-floor", "process_us_per_answer", "process CPU"),
                       ("nfqueue-answer-floor", "process_us_per_answer", "process CPU"),
                       ("kernel-syncookies", "cpu_us_per_answer", "CPU"),
                       ("iptables-synproxy", "cpu_us_per_answer", "CPU")),
    "synproxy-front-fast-path": (("nfqueue-floor", "cpu_us_per_answer", "CPU"),
                                 ("synproxy-front", "cpu_us_per_answer", "CPU"),
                                 ("kernel-syncookies", "cpu_us_per_answer", "CPU"),
                                 ("iptables-synproxy", "cpu_us_per_answer", "CPU")),
}


def ratio_lines(results: dict, summary: dict[str, dict]) -> str:
    parts = []
    for ours, comparisons in COMPARISONS.items():
        for other, key, what in comparisons:
            matched = matched_ratio(results, ours, other, key)
            if matched:
                rates = "–".join(str(rate) for rate in (matched[0][0], matched[0][-1]) if rate) \
                    if len(matched[0]) > 1 else str(matched[0][0])
                parts.append(f"{what} per SYN, {ours} / {other} (median over {rates} SYN/s offered): "
                             f"**{matched[1]:.2f}×**")
            front, theirs = summary.get(ours, {}), summary.get(other, {})
            if front.get("capacity_pps") and theirs.get("capacity_pps") and not other.startswith("nfqueue"):
                parts.append(f"capacity, {ours} / {other}: {front['capacity_pps'] / theirs['capacity_pps']:.2f}×")
    return "; ".join(parts) + "." if parts else "Ratios need the front and at least one other contender."


def plots(results: dict, output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name: str, key):
        steps = [s for s in results["steps"] if s["contender"] == name]
        return [s["sent_pps"] / 1000 for s in steps], [key(s) for s in steps]

    charts = (
        ("answered_per_second.png", "answered per second (thousands)", lambda s: s["answered_pps"] / 1000, False),
        ("cpu_per_syn.png", "CPU µs per answer (net of the generator)", lambda s: s["cpu_us_per_answer"], True),
        ("legit_connect.png", "legit clients: p99 connect time (ms)",
         lambda s: s["legit"]["connect_p99_ms"] if s["legit"] else None, True),
    )
    for filename, label, key, log_scale in charts:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for name in results["contenders"]:
            if name == "sink" and filename != "answered_per_second.png":
                continue
            x, y = series(name, key)
            points = [(a, b) for a, b in zip(x, y) if b is not None and (b > 0 or not log_scale)]
            if points:
                axes.plot(*zip(*points), marker="o", label=name)
        axes.set_xlabel("SYNs sent per second (thousands)")
        axes.set_ylabel(label)
        if log_scale:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(output / filename, dpi=100)
        plt.close(figure)


def write_report(results: dict, output: Path) -> dict[str, dict]:
    summary = summarise(results)
    results = {**results, "summary": summary}
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results.md").write_text(markdown(results, summary))
    plots(results, output)
    return summary
