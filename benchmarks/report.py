"""The bench's results as JSON, markdown tables (median and min–max over the repetitions) and PNG plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from benchmarks.measure import CONTENDER_CPU

UNSATURATED = 0.9  # a step counts for the per-SYN cost when it answered at least this share of what was sent
PLOTS = {"syn": ("answered_per_second.png", "cpu_per_syn.png", "legit_connect.png"),
         "ack": ("ack_floods.png",), "mixed": ("ack_floods.png",), "upload": ("upload.png",)}
BYPASS = "kernel-syncookies"  # in the upload: the router sends the VIP straight to the backend
# The contender set against the others in the summary's ratios, and the others.
OURS = ("synproxy-front-fast-path", "synproxy-front")
THEIRS = ("kernel-syncookies", "iptables-synproxy", "nfqueue-floor", "synproxy-front")
FLOOD_TITLES = {"syn": "SYN flood", "ack": "ACK flood (random cookies)", "mixed": "mixed SYN+ACK flood"}


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


def per_repetition_cost(steps: list[dict], key: str) -> float | None:
    """One repetition's per-SYN cost of a contender at paced rates: the median over its paced steps that
    answered at least 90 % of what was sent."""
    costed = [s for s in steps if s[key] is not None and s["offered_pps"]]
    unsaturated = [s for s in costed if s["answered"] >= UNSATURATED * s["sent"]]
    values = [s[key] for s in unsaturated]
    return statistics.median(values) if values else None


def add_sink_share(steps: list[dict]) -> None:
    """Each SYN step's contender-CPU µs per answer less the sink's µs per packet at the same offered rate
    in the same repetition, times the packets sent: the cost of handing a packet to the contender CPU
    at all (RPS: an interrupt to wake that CPU, its backlog), which at paced rates is most of it."""
    sink = {(s["repetition"], s["offered_pps"]): s["cpu_us_per_packet"] for s in steps
            if s["scenario"] == "syn" and s["contender"] == "sink"}
    for s in steps:
        floor = sink.get((s["repetition"], s["offered_pps"]))
        s["cpu_us_per_answer_over_sink"] = (
            round((s["contender_cpu_seconds"] * 1e6 - floor * s["sent"]) / s["answered"], 2)
            if s["scenario"] == "syn" and s["cpu_us_per_answer"] is not None and floor is not None else None)


def summarise(results: dict) -> dict[str, dict]:
    """Per contender, per repetition: SYN capacity, contender-CPU µs per SYN (at the top rate, and at
    the paced rates net of the sink), the legitimate clients at the top rate, and the BPF programs' ns
    per run; then median and min–max over repetitions."""
    summary = {}
    syn_steps = [s for s in results["steps"] if s["scenario"] == "syn"]
    for name in results["contenders"]:
        per_rep = {key: [] for key in ("capacity", "cpu_us_top", "cpu_us_paced_over_sink", "process_us", "sink_us",
                                       "legit_success", "legit_p99", "sent_share_min")}
        bpf: dict[str, list[float]] = {}
        steps_of = [[s for s in syn_steps if s["contender"] == name and s["repetition"] == rep]
                    for rep in repetitions_of(results)]
        for steps in steps_of:
            if not steps:
                continue
            top = max(steps, key=lambda s: s["sent_pps"])
            per_rep["capacity"].append(max(s["answered_pps"] for s in steps))
            per_rep["cpu_us_top"].append(top["cpu_us_per_answer"])
            per_rep["cpu_us_paced_over_sink"].append(per_repetition_cost(steps, "cpu_us_per_answer_over_sink"))
            per_rep["process_us"].append(per_repetition_cost(steps, "process_us_per_answer"))
            per_rep["sink_us"].append(top["cpu_us_per_packet"] if name == "sink" else None)
            per_rep["legit_success"].append(legit_success(top))
            per_rep["legit_p99"].append(top["legit"]["connect_p99_ms"])
            per_rep["sent_share_min"].append(min((s["sent_share"] for s in steps if s["sent_share"]), default=None))
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
                              ("contender-CPU µs per SYN at paced rates, over the sink", "cpu_us_paced_over_sink"),
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
        "cpu_us_per_answer_over_sink": spread(s.get("cpu_us_per_answer_over_sink") for s in steps),
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
            }
    return table


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
    if any(s["scenario"] == "syn" for s in results["steps"]):
        lines += ["## SYN flood: summary", "",
                  ("| contender | capacity (answered/s) | contender-CPU µs per SYN at the top rate "
                   "| paced, over the sink | process µs per SYN (paced) | legit success at top rate "
                   "| legit p99 connect at top rate (ms) | BPF ns per run at top rate | flood SYNs at backend |"),
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for name, s in summary.items():
            if s["capacity"] is None:
                continue
            cost = s["sink_us"] if name == "sink" else s["cpu_us_top"]
            bpf = "; ".join(f"{where}: {_cell(figure, digits=0)}"
                            for where, figure in s["bpf_ns_per_run_at_top_rate"].items() if figure) or "–"
            lines.append(f"| {name} | {_cell(s['capacity'], digits=0)} | {_cell(cost)}"
                         f"{' per packet' if name == 'sink' else ''} | {_cell(s['cpu_us_paced_over_sink'])} | "
                         f"{_cell(s['process_us'])} | "
                         f"{_cell(s['legit_success'], 100, 1, ' %')} | {_cell(s['legit_p99'])} | {bpf} | "
                         f"{s['flood_syns_at_backend']} |")
        lines += ["", "Ratios (per repetition, then median [min–max]):", "",
                  "| ours / theirs | what | ratio |", "|---|---|---:|"]
        lines += [f"| {r['ours']} / {r['theirs']} | {r['what']} | {_cell(r['ratio'])}× |"
                  for r in ratios(results, summary)]
        lines.append("")
    uploads = upload_figures(results)
    if uploads:
        lines += [f"## Bulk upload (client → VIP, HTTP POST of {results['upload_bytes'] // 1_000_000} MB)", "",
                  "| contender | MB/s | × bypass | complete | contender-CPU µs per MB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name}{' (bypass)' if name == BYPASS else ''} | {_cell(u['mb_per_second'], digits=1)} | "
                  f"{_cell(u['vs_bypass'])} | {u['complete']}/{u['runs']} | {_cell(u['contender_cpu_us_per_mb'], digits=0)} |"
                  for name, u in uploads.items()]
        lines.append("")
    lines += ["## Every step (median [min–max] over the repetitions)", "",
              ("| flood | contender | offered/s | generated/s | sent/s | sent / nominal | answered/s | backlog drops "
               "| contender-CPU µs per answer | over the sink | per packet sent "
               "| BPF ns per run | legit success | p50 / p99 ms | idle p99 ms | flood at backend "
               "| other sessions' CPU-s on the contender CPU |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for (scenario, name, rate), steps in grouped(results["steps"]).items():
        f = step_figures(steps)
        short = f" **< 90 % in {f['short_of_nominal']}**" if f["short_of_nominal"] else ""
        noisy = "".join(f" ({text} in {count})" for text, count in (("noisy idle", f["noisy_idle"]),
                                                                     ("other load", f["other_load"])) if count)
        bpf = "; ".join(f"{where}: {_cell(figure, digits=0)}" for where, figure in f["bpf"].items() if figure) or "–"
        lines.append(f"| {scenario} | {name}{noisy} | {rate or 'max'} | {_cell(f['generated_pps'], digits=0)} | "
                     f"{_cell(f['sent_pps'], digits=0)} | "
                     f"{_cell(f['sent_share'], 100, 0, ' %')}{short} | {_cell(f['answered_pps'], digits=0)} | "
                     f"{_cell(f['backlog_drops'], digits=0)} | {_cell(f['cpu_us_per_answer'])} | "
                     f"{_cell(f['cpu_us_per_answer_over_sink'])} | {_cell(f['cpu_us_per_packet'])} | "
                     f"{bpf} | {_cell(f['legit_success'], 100, 1, ' %')} | "
                     f"{_cell(f['legit_p50_ms'])} / {_cell(f['legit_p99_ms'])} | {_cell(f['idle_legit_p99_ms'])} | "
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
    add_sink_share(results["steps"])
    summary = summarise(results)
    results = {**results, "summary": summary, "ratios": ratios(results, summary),
               "upload_summary": upload_figures(results),
               "steps_summary": [{"scenario": k[0], "contender": k[1], "offered_pps": k[2], **step_figures(v)}
                                 for k, v in grouped(results["steps"]).items()]}
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots(results, output)
    (output / "results.md").write_text(markdown(results, summary, output))
    return summary
