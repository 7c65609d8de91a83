"""The bench's results as JSON, markdown tables (median and min–max over the repetitions) and PNG plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from benchmarks.contenders import FRONT
from benchmarks.measure import CONTENDER_CPU

PLOTS = {"syn": ("answered_per_second.png", "cpu_per_syn.png", "legit_connect.png"),
         "ack": ("ack_floods.png",), "mixed": ("ack_floods.png",), "upload": ("upload.png",)}
BYPASS = "kernel-syncookies"  # in the upload: the router sends the VIP straight to the backend
# The contender set against the others in the summary's ratios, and the others.
OURS = ("synproxy-front", "synproxy-front-tc", "synproxy-front-nfqueue")
THEIRS = ("kernel-syncookies", "iptables-synproxy", "nfqueue-floor")
HEADLINE = "synproxy-front"  # the default front (data_plane auto): the issue's targets are its figures
ANCHORS = ("kernel-syncookies", "iptables-synproxy")


def append_scenario(output: Path, name: str, summary: dict, markdown: str) -> None:
    """A scenario run beside the floods (connections, fastopen): its section at the end of results.md,
    its summary in NAME.json."""
    (output / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(output / "results.md", "a") as report:
        report.write("\n" + markdown)


def spread(values) -> dict | None:
    """Median, min and max of the values present (one per repetition)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": round(statistics.median(present), 3), "min": round(min(present), 3),
            "max": round(max(present), 3), "n": len(present)}


def _cell(figure: dict | None, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    if figure is None:
        return "–"
    values = [round(figure[key] * scale, digits) for key in ("median", "min", "max")]
    if digits == 0:
        values = [int(v) for v in values]
    if figure["n"] == 1 or values[1] == values[2]:
        return f"{values[0]}{suffix}"
    return f"{values[0]}{suffix} [{values[1]}–{values[2]}]"


def legit_success(step: dict) -> float | None:
    legit = step.get("legit")
    return legit["completed"] / legit["attempts"] if legit and legit["attempts"] else None


def repetitions_of(results: dict) -> range:
    return range(results["repetitions"])


def front_program(bpf: dict[str, dict]) -> dict | None:
    """The front's program that did the work in a step: of front0's, the one that ran most (in the XDP
    mode the tc program behind it sees only what XDP passes on)."""
    ours = [program for where, program in bpf.items() if where.startswith(f"{FRONT} ") and program["runs"]]
    return max(ours, key=lambda program: program["runs"]) if ours else None


def front_ns_per_run(bpf: dict[str, dict]) -> float | None:
    program = front_program(bpf)
    return program["ns_per_run"] if program else None


def veth_dropped(step: dict) -> int:
    """Frames the two ends of front0's veth dropped or failed in a step (all their drop and error counters)."""
    return sum(sum(counters.values()) for counters in step.get("veth_drops", {}).values())


def p99_over_idle(step: dict) -> float | None:
    """A step's legitimate p99 connect time over its idle step's (the issue's target: at most 2×)."""
    loaded, idle = step["legit"].get("connect_p99_ms"), step["idle_legit"].get("connect_p99_ms")
    return loaded / idle if loaded is not None and idle else None


def top_step(steps: list[dict]) -> dict:
    """The unpaced step (offered 0) if there is one, else the highest offered rate."""
    return max(steps, key=lambda s: s["offered_pps"] or float("inf"))


def summarise(results: dict) -> dict[str, dict]:
    """Per contender, per repetition: SYN capacity, contender-CPU µs per SYN at the top rate (where its
    CPU is busiest), how busy that CPU was, the legitimate clients at the top rate, and the BPF
    programs' ns per run; then median and min–max over repetitions."""
    summary = {}
    syn_steps = [s for s in results["steps"] if s["scenario"] == "syn"]
    for name in results["contenders"]:
        per_rep = {key: [] for key in ("capacity", "cpu_us_top", "cpu_busy_top", "process_us", "sink_us",
                                       "legit_success", "legit_p99", "sent_share_min", "veth_dropped_top")}
        bpf: dict[str, list[float]] = {}
        steps_of = [[s for s in syn_steps if s["contender"] == name and s["repetition"] == rep]
                    for rep in repetitions_of(results)]
        for steps in steps_of:
            if not steps:
                continue
            top = top_step(steps)
            per_rep["capacity"].append(max(s["answered_pps"] for s in steps))
            per_rep["cpu_us_top"].append(top["cpu_us_per_answer"])
            per_rep["cpu_busy_top"].append(top["contender_cpu_seconds"] / top["seconds"] if top["seconds"] else None)
            per_rep["process_us"].append(top["process_us_per_answer"])
            per_rep["sink_us"].append(top["cpu_us_per_packet"] if name == "sink" else None)
            per_rep["legit_success"].append(legit_success(top))
            per_rep["legit_p99"].append(top["legit"]["connect_p99_ms"])
            per_rep["sent_share_min"].append(min((s["sent_share"] for s in steps if s["sent_share"]), default=None))
            per_rep["veth_dropped_top"].append(veth_dropped(top))
            for where, program in top["bpf"].items():
                bpf.setdefault(program_name(where), []).append(program["ns_per_run"])
        summary[name] = {key: spread(values) for key, values in per_rep.items()}
        summary[name]["bpf_ns_per_run_at_top_rate"] = {where: spread(values) for where, values in bpf.items()}
        summary[name]["flood_syns_at_backend"] = sum(s["flood_syns_at_backend"] for s in syn_steps
                                                     if s["contender"] == name)
        summary[name]["per_repetition"] = per_rep
    return summary


def ratios(results: dict, summary: dict[str, dict]) -> list[dict]:
    """Ours / theirs per repetition (same repetition: the closest in time), then median and min–max."""
    rows = []
    for ours in OURS:
        for theirs in THEIRS:
            if ours == theirs or ours not in summary or theirs not in summary:
                continue
            for what, key in (("contender-CPU µs per SYN at the top rate", "cpu_us_top"),
                              ("SYN capacity", "capacity")):
                if key == "capacity" and theirs.startswith("nfqueue"):
                    continue
                mine, other = summary[ours]["per_repetition"][key], summary[theirs]["per_repetition"][key]
                # A cost at or below zero is noise larger than the cost (another load during the idle
                # step): no ratio from that repetition.
                values = [a / b for a, b in zip(mine, other) if a is not None and b is not None and a > 0 and b > 0]
                if values:
                    rows.append({"what": what, "ours": ours, "theirs": theirs, "ratio": spread(values)})
    return rows


def program_name(where: str) -> str:
    """A program's place and name without its ID, which changes each time a contender loads it."""
    return re.sub(r":\[\d+\]$", "", where)


def grouped(steps: list[dict]) -> dict[tuple, list[dict]]:
    """Steps by (scenario, contender, offered rate), in the order they first appear."""
    groups: dict[tuple, list[dict]] = {}
    for s in steps:
        groups.setdefault((s["scenario"], s["contender"], s["offered_pps"]), []).append(s)
    return groups


def step_figures(steps: list[dict]) -> dict:
    """One (scenario, contender, rate)'s figures over its repetitions."""
    return {
        "generated_pps": spread(s["generated_pps"] for s in steps),
        "sent_pps": spread(s["sent_pps"] for s in steps),
        "sent_share": spread(s["sent_share"] for s in steps),
        "short_of_nominal": sum(s["short_of_nominal"] for s in steps),
        "answered_pps": spread(s["answered_pps"] for s in steps),
        "cpu_us_per_answer": spread(s["cpu_us_per_answer"] for s in steps),
        "cpu_us_per_packet": spread(s["cpu_us_per_packet"] for s in steps),
        "generator_cpu_us_per_packet": spread(s["generator_cpu_us_per_packet"] for s in steps),
        "process_us_per_packet": spread(s["process_us_per_packet"] for s in steps),
        "legit_success": spread(legit_success(s) for s in steps),
        "legit_p50_ms": spread(s["legit"]["connect_p50_ms"] for s in steps),
        "legit_p99_ms": spread(s["legit"]["connect_p99_ms"] for s in steps),
        "idle_legit_p99_ms": spread(s["idle_legit"]["connect_p99_ms"] for s in steps),
        "flood_at_backend": spread(s["flood_syns_at_backend"] + s["flood_acks_at_backend"] for s in steps),
        "resets": spread(s["resets"] for s in steps),
        "backlog_drops": spread(s["backlog_drops"] for s in steps),
        "noisy_idle": sum(s["noisy_idle"] for s in steps),
        "other_load": sum(s.get("other_load", False) for s in steps),
        "others_on_contender_cpu": spread(s.get("other_processes_cpu_seconds", {}).get(str(CONTENDER_CPU),
                                          s.get("other_processes_cpu_seconds", {}).get(CONTENDER_CPU)) for s in steps),
        "contender_cpu_busy": spread(s["contender_cpu_seconds"] / s["seconds"] for s in steps if s["seconds"]),
        "p99_over_idle": spread(p99_over_idle(s) for s in steps),
        "veth_dropped": spread(veth_dropped(s) for s in steps),
        "bpf": {name: spread(program["ns_per_run"] for s in steps for where, program in s["bpf"].items()
                             if program_name(where) == name)
                for name in sorted({program_name(where) for s in steps for where in s["bpf"]})},
    }


def upload_figures(results: dict) -> dict[str, dict]:
    """Per contender: MB/s over the repetitions, and its ratio to the bypass in the same repetition."""
    uploads = results.get("uploads", [])
    bypass = {u["repetition"]: u["mb_per_second"] for u in uploads if u["contender"] == BYPASS}
    table = {}
    for name in results["contenders"]:
        mine = [u for u in uploads if u["contender"] == name]
        if mine:
            table[name] = {
                "mb_per_second": spread(u["mb_per_second"] for u in mine),
                "vs_bypass": spread(u["mb_per_second"] / bypass[u["repetition"]] for u in mine
                                    if bypass.get(u["repetition"])),
                "complete": sum(u["complete"] for u in mine), "runs": len(mine),
                "contender_cpu_us_per_mb": spread(u["contender_cpu_us_per_mb"] for u in mine),
                "front_ns_per_packet": spread(front_ns_per_run(u.get("bpf", {})) for u in mine),
                "front_runs": spread((front_program(u.get("bpf", {})) or {}).get("runs") for u in mine),
                "veth_dropped": spread(veth_dropped(u) for u in mine),
            }
    return table


def _per_repetition(results: dict, name: str, scenario: str, value) -> list:
    """``value(step)`` of a contender's unpaced (or highest-rate) step in each repetition."""
    found = []
    for repetition in repetitions_of(results):
        steps = [s for s in results["steps"] if s["contender"] == name and s["scenario"] == scenario
                 and s["repetition"] == repetition]
        found.append(value(top_step(steps)) if steps else None)
    return found


def verdict(values: list, holds) -> str:
    """Whether a target holds in every repetition, only in the median, or not."""
    present = [v for v in values if v is not None]
    if not present:
        return "not measured"
    if all(holds(v) for v in present):
        return "**met**"
    return "median only" if holds(statistics.median(present)) else "not met"


def targets(results: dict, summary: dict[str, dict]) -> list[dict]:
    """The issue's targets (issue 13), per repetition for each front mode and anchor, judged on the
    default front: every repetition, only the median, or not."""
    contenders = [name for name in (*OURS, *ANCHORS) if name in results["contenders"]]
    uploads = {(u["contender"], u["repetition"]): u for u in results.get("uploads", [])}
    bypass = {rep: u["mb_per_second"] for (name, rep), u in uploads.items() if name == BYPASS}

    def upload_share(name: str) -> list:
        return [uploads[(name, rep)]["mb_per_second"] / bypass[rep] if (name, rep) in uploads and bypass.get(rep)
                else None for rep in repetitions_of(results)]

    def upload_ns(name: str) -> list:
        return [front_ns_per_run(uploads[(name, rep)].get("bpf", {})) if (name, rep) in uploads else None
                for rep in repetitions_of(results)]

    def cpu_ratio(name: str, anchor: str) -> list:
        if name in ANCHORS or anchor not in summary or name not in summary:
            return []
        return [a / b if a and b and a > 0 and b > 0 else None for a, b in
                zip(summary[name]["per_repetition"]["cpu_us_top"], summary[anchor]["per_repetition"]["cpu_us_top"])]

    rows = [
        ("ACK flood at max: legit success ≥ 99 %", "%", lambda v: v >= 0.99,
         lambda n: _per_repetition(results, n, "ack", legit_success)),
        ("ACK flood at max: p99 connect ≤ 2× idle p99", "×", lambda v: v <= 2,
         lambda n: _per_repetition(results, n, "ack", p99_over_idle)),
        ("mixed flood at max: legit success ≥ 99 %", "%", lambda v: v >= 0.99,
         lambda n: _per_repetition(results, n, "mixed", legit_success)),
        ("mixed flood at max: p99 connect ≤ 2× idle p99", "×", lambda v: v <= 2,
         lambda n: _per_repetition(results, n, "mixed", p99_over_idle)),
        ("upload ≥ 50 % of the bypass (same repetition)", "×", lambda v: v >= 0.5, upload_share),
        ("front program ≤ 400 ns per SYN answered (bpf_stats, SYN flood at max)", "ns", lambda v: v <= 400,
         lambda n: _per_repetition(results, n, "syn", lambda s: front_ns_per_run(s["bpf"]))),
        ("front program ≤ 150 ns per forwarded packet (bpf_stats, upload)", "ns", lambda v: v <= 150, upload_ns),
        ("front program ≤ 150 ns per forwarded packet (bpf_stats, ACK flood at max)", "ns", lambda v: v <= 150,
         lambda n: _per_repetition(results, n, "ack", lambda s: front_ns_per_run(s["bpf"]))),
        ("contender-CPU µs per SYN at max (below), SYN flood", "µs", None,
         lambda n: summary[n]["per_repetition"]["cpu_us_top"] if n in summary else []),
        ("CPU per SYN below kernel SYN cookies' (ratio < 1)", "×", lambda v: v < 1,
         lambda n: cpu_ratio(n, "kernel-syncookies")),
        ("CPU per SYN below iptables SYNPROXY's (ratio < 1)", "×", lambda v: v < 1,
         lambda n: cpu_ratio(n, "iptables-synproxy")),
        ("frames front0's veth dropped at the SYN / ACK / mixed max steps (both ends)", "", None,
         lambda n: [sum(v or 0 for v in values) for values in zip(
             *(_per_repetition(results, n, scenario, veth_dropped) for scenario in ("syn", "ack", "mixed")))]),
    ]
    table = []
    for what, unit, holds, values_of in rows:
        values = {name: values_of(name) for name in contenders}
        table.append({"target": what, "unit": unit, "values": {name: spread(v) for name, v in values.items()},
                      "per_repetition": values,
                      "verdict": verdict(values.get(HEADLINE, []), holds) if holds else None})
    return table


def _target_cell(figure: dict | None, unit: str) -> str:
    if unit == "%":
        return _cell(figure, 100, 1, " %")
    if unit == "ns":
        return _cell(figure, digits=0)
    if unit == "":
        return _cell(figure, digits=0)
    return _cell(figure, suffix=unit if unit == "×" else "")


def markdown(results: dict, summary: dict[str, dict], output: Path) -> str:
    machine = results["machine"]
    lines = [
        "# Benchmark results", "",
        (f"{machine['date']}, {machine['minutes']} minutes, Linux {machine['kernel']}, {machine['cpus']} CPUs, "
         f"Python {machine['python']}; {results['repetitions']} repetition(s), contender order rotated; "
         f"{results['seconds_per_step']} s per flood step, each after an idle step of "
         f"{results['idle_seconds_per_step']} s; the generator on CPU {results['generator_cpu']}, the contender's "
         f"work on CPU {results['contender_cpu']}. Figures: median [min–max] over the repetitions. "
         "Method: `benchmarks/README.md`."), ""]
    running = {name: sorted({json.dumps(r, sort_keys=True) for r in found})
               for name, found in results.get("running", {}).items()}
    if running:
        lines += ["What each contender ran (per repetition, as it reported): " + "; ".join(
            f"{name}: {' / '.join(found)}" for name, found in running.items()),
            ""]
    rows = targets(results, summary)
    columns = [name for name in (*OURS, *ANCHORS) if name in results["contenders"]]
    if rows and HEADLINE in columns:
        lines += ["## The issue's targets (issue 13), side by side", "",
                  ("Median [min–max] over the repetitions; met: in every repetition (**met**), only in the median, "
                   f"or not, for the default front (`{HEADLINE}`)."), "",
                  "| target | " + " | ".join(columns) + " | met |", "|---|" + "---:|" * len(columns) + "---|"]
        lines += [f"| {row['target']} | " + " | ".join(_target_cell(row["values"][name], row["unit"])
                                                      for name in columns) + f" | {row['verdict'] or ''} |"
                  for row in rows]
        lines.append("")
    if any(s["scenario"] == "syn" for s in results["steps"]):
        lines += ["## SYN flood: summary", "",
                  ("| contender | capacity (answered/s) | contender-CPU µs per SYN at the top rate "
                   "| contender CPU busy at the top rate | process µs per SYN at the top rate "
                   "| legit success at top rate | legit p99 connect at top rate (ms) | BPF ns per run at top rate "
                   "| veth drops at top rate | flood SYNs at backend |"),
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for name, s in summary.items():
            if s["capacity"] is None:
                continue
            cost = s["sink_us"] if name == "sink" else s["cpu_us_top"]
            bpf = "; ".join(f"{where}: {_cell(figure, digits=0)}"
                            for where, figure in s["bpf_ns_per_run_at_top_rate"].items() if figure) or "–"
            lines.append(f"| {name} | {_cell(s['capacity'], digits=0)} | {_cell(cost)}"
                         f"{' per packet' if name == 'sink' else ''} | {_cell(s['cpu_busy_top'], 100, 0, ' %')} | "
                         f"{_cell(s['process_us'])} | "
                         f"{_cell(s['legit_success'], 100, 1, ' %')} | {_cell(s['legit_p99'])} | {bpf} | "
                         f"{_cell(s['veth_dropped_top'], digits=0)} | {s['flood_syns_at_backend']} |")
        lines += ["", "Ratios (per repetition, then median [min–max]):", "",
                  "| ours / theirs | what | ratio |", "|---|---|---:|"]
        lines += [f"| {r['ours']} / {r['theirs']} | {r['what']} | {_cell(r['ratio'])}× |"
                  for r in ratios(results, summary)]
        lines.append("")
    uploads = upload_figures(results)
    if uploads:
        lines += [f"## Bulk upload (client → VIP, HTTP POST of {results['upload_bytes'] // 1_000_000} MB)", "",
                  ("| contender | MB/s | × bypass | complete | contender-CPU µs per MB | front program ns per packet "
                   "(runs) | veth drops |"), "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {name}{' (bypass)' if name == BYPASS else ''} | {_cell(u['mb_per_second'], digits=1)} | "
                  f"{_cell(u['vs_bypass'])} | {u['complete']}/{u['runs']} | {_cell(u['contender_cpu_us_per_mb'], digits=0)} | "
                  f"{_cell(u['front_ns_per_packet'], digits=0)} ({_cell(u['front_runs'], digits=0)}) | "
                  f"{_cell(u['veth_dropped'], digits=0)} |"
                  for name, u in uploads.items()]
        lines.append("")
    lines += ["## Every step (median [min–max] over the repetitions)", "",
              ("| flood | contender | offered/s | generated/s | sent/s | sent / nominal | answered/s | backlog drops "
               "| veth drops | contender CPU busy | contender-CPU µs per answer | per packet sent "
               "| BPF ns per run | legit success | p50 / p99 ms | idle p99 ms | p99 / idle p99 | flood at backend "
               "| other sessions' CPU-s on the contender CPU |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (scenario, name, rate), steps in grouped(results["steps"]).items():
        f = step_figures(steps)
        short = f" **< 90 % in {f['short_of_nominal']}**" if f["short_of_nominal"] else ""
        noisy = "".join(f" ({text} in {count})" for text, count in (("noisy idle", f["noisy_idle"]),
                                                                     ("other load", f["other_load"])) if count)
        bpf = "; ".join(f"{where}: {_cell(figure, digits=0)}" for where, figure in f["bpf"].items() if figure) or "–"
        lines.append(f"| {scenario} | {name}{noisy} | {rate or 'max'} | {_cell(f['generated_pps'], digits=0)} | "
                     f"{_cell(f['sent_pps'], digits=0)} | "
                     f"{_cell(f['sent_share'], 100, 0, ' %')}{short} | {_cell(f['answered_pps'], digits=0)} | "
                     f"{_cell(f['backlog_drops'], digits=0)} | {_cell(f['veth_dropped'], digits=0)} | "
                     f"{_cell(f['contender_cpu_busy'], 100, 0, ' %')} | {_cell(f['cpu_us_per_answer'])} | "
                     f"{_cell(f['cpu_us_per_packet'])} | "
                     f"{bpf} | {_cell(f['legit_success'], 100, 1, ' %')} | "
                     f"{_cell(f['legit_p50_ms'])} / {_cell(f['legit_p99_ms'])} | {_cell(f['idle_legit_p99_ms'])} | "
                     f"{_cell(f['p99_over_idle'], suffix='×')} | "
                     f"{_cell(f['flood_at_backend'], digits=0)} | {_cell(f['others_on_contender_cpu'])} |")
    lines += ["", "## Contenders", ""]
    lines += [f"- **{name}**: {text}" for name, text in results["contenders"].items()]
    plots_made = [p for p in dict.fromkeys(p for group in PLOTS.values() for p in group) if (output / p).exists()]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in plots_made), ""]
    return "\n".join(lines)


def plots(results: dict, output: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(results["steps"])

    def line_chart(filename: str, scenarios: tuple[str, ...], label: str, key, log_scale: bool, skip_sink: bool):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for scenario in scenarios:
            for name in results["contenders"]:
                if skip_sink and name == "sink":
                    continue
                points = []
                for (group_scenario, group_name, _rate), steps in groups.items():
                    if (group_scenario, group_name) != (scenario, name):
                        continue
                    values = [key(s) for s in steps if key(s) is not None]
                    if values and (not log_scale or min(values) > 0):
                        points.append((statistics.median(s["sent_pps"] for s in steps) / 1000,
                                       statistics.median(values), min(values), max(values)))
                if points:
                    points.sort()
                    x, y, low, high = zip(*points)
                    axes.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                                  marker="o", capsize=3,
                                  label=name if len(scenarios) == 1 else f"{name} ({scenario})")
        axes.set_xlabel("packets sent per second (thousands)")
        axes.set_ylabel(label)
        if log_scale:
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(output / filename, dpi=100)
        plt.close(figure)

    scenarios = set(results["scenarios"])
    if "syn" in scenarios:
        line_chart("answered_per_second.png", ("syn",), "SYN flood: answered per second (thousands)",
                   lambda s: s["answered_pps"] / 1000, False, False)
        line_chart("cpu_per_syn.png", ("syn",), "contender-CPU µs per SYN answered",
                   lambda s: s["cpu_us_per_answer"], True, True)
        line_chart("legit_connect.png", ("syn",), "SYN flood: legit p99 connect (ms)",
                   lambda s: s["legit"]["connect_p99_ms"], True, True)
    floods = tuple(s for s in ("ack", "mixed") if s in scenarios)
    if floods:
        line_chart("ack_floods.png", floods, "ACK / mixed flood: legit success (%)",
                   lambda s: None if legit_success(s) is None else 100 * legit_success(s), False, True)
    uploads = upload_figures(results)
    if uploads:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        names = list(uploads)
        medians = [uploads[n]["mb_per_second"]["median"] for n in names]
        low = [m - uploads[n]["mb_per_second"]["min"] for m, n in zip(medians, names)]
        high = [uploads[n]["mb_per_second"]["max"] - m for m, n in zip(medians, names)]
        axes.bar(range(len(names)), medians, yerr=[low, high], capsize=4)
        axes.set_xticks(range(len(names)), [n + (" (bypass)" if n == BYPASS else "") for n in names],
                        rotation=15, fontsize=7)
        axes.set_ylabel("upload MB/s")
        axes.set_yscale("log")
        axes.grid(True, alpha=0.3, axis="y")
        figure.tight_layout()
        figure.savefig(output / "upload.png", dpi=100)
        plt.close(figure)


def write_report(results: dict, output: Path) -> dict[str, dict]:
    summary = summarise(results)
    results = {**results, "summary": summary, "ratios": ratios(results, summary),
               "targets": targets(results, summary),
               "upload_summary": upload_figures(results),
               "steps_summary": [{"scenario": k[0], "contender": k[1], "offered_pps": k[2], **step_figures(v)}
                                 for k, v in grouped(results["steps"]).items()]}
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots(results, output)
    (output / "results.md").write_text(markdown(results, summary, output))
    return summary
