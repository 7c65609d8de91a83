"""Where the front program's time goes, stage by stage (`python3 -m benchmarks.front_xdp_stages [--program tc]
[--syn-reply ingress]`, root).

Builds variants of bpf/front.bpf.c that stop after one stage each: an early return (counted `queued`,
as every variant's exit is, so each pays one counter) inserted before a named line of the source; a
barrier keeps the stage's result alive, so the compiler cannot drop the work. Then measures every
variant as benchmarks/front_xdp_cost.py does (bpf_stats, one BPF_PROG_TEST_RUN per run), the
repetitions interleaved across variants: a stage's cost is the difference between consecutive rows.
An anchor the source no longer has is an error: move it with the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.front_xdp_cost import ETHERNET, cost_namespace, packets, per_run, policy_and_schedule
from synproxy import netns
from synproxy.bpf.loading import bpf_dir, build_object
from synproxy.front.fastpath import FastPath

KINDS = ("syn_answered", "validated", "forwarded_bad_mac (established, 100 B)")
STOP = """
#define STOP_AFTER(stage, value, exit) do { if (STOP_STAGE == (stage)) { __u64 kept = (__u64)(value); \\
	asm volatile("" : "+r"(kept)); if (kept != 0x5bad5bad5bad) return exit; } } while (0)
"""
FORWARD_EXIT, XDP_EXIT, TC_EXIT = "FRONT_QUEUED", "count_xdp(seg, FRONT_QUEUED, XDP_PASS)", "count(seg, FRONT_QUEUED, TC_ACT_OK)"
# (stage, the line it ends before, what stays alive, the exit): SYN stages, then forwarding ones.
STAGES = (
    ("parse, VIP and port lookups", "\tif (seg.flags & TCP_FLAG_SYN) {\n", "seg.sport",
     "count_on(path, &seg, FRONT_QUEUED, pass)"),
    ("SYN: length checks, buffers, TCP header copied", "\t/* Checksums: the IPv4 header's", "walk.tcp[3]",
     FORWARD_EXIT),
    ("SYN: checksums", "\tif (!read_common_options(&walk)) {\n", "sum", FORWARD_EXIT),
    ("SYN: options", "\t__u64 now_ns = bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;\n\tconst struct fastopen_key",
     "options->mss ^ options->tsval ^ options->wscale", FORWARD_EXIT),
    ("SYN: clock, salt slot", "\t__u8 sack = cfg->sack && options->sack_permitted;\n", "slot", FORWARD_EXIT),
    ("SYN: cookie (SipHash-2-4, 48 bytes)", "\t/* The SYN-ACK's TCP header and options,", "cookie", FORWARD_EXIT),
    ("SYN: SYN-ACK headers", "\tstruct bpf_fib_lookup fib = {};\n\t/* An unresolved", "answer.tcp_length", XDP_EXIT),
    ("SYN: SYN-ACK headers", "\tint route = next_hop_back(skb,", "answer.tcp_length", TC_EXIT),
    ("SYN: next hop back", "\t/* Linux's SYN (MSS, SACK, timestamps, window scale) is as long", "fib.ifindex", XDP_EXIT),
    ("SYN: next hop back", "\t/* Rewrite the packet: IP header, TCP header, nothing after. */\n", "route", TC_EXIT),
    ("forward: configuration, length and IPv4 header checks", "\t__u32 outcome = FRONT_FORWARDED;\n", "fwd",
     FORWARD_EXIT),
    ("forward: clock, salt slot", "\t\tif (!slot || !epoch_accepted(slot->epoch, now_ns,", "slot", FORWARD_EXIT),
    ("forward: cookie check", "\treturn plan_encapsulation(ctx, xdp, copy, seg, flags, outcome, plan);",
     "outcome", FORWARD_EXIT),
    ("forward: flow hash (SipHash-1-3, 40 bytes; or the flow's kept one)", "\t__u32 index = flow % MAGLEV_TABLE_SIZE;\n", "flow",
     FORWARD_EXIT),
    ("forward: Maglev entry", "\tplan->backend = backend;\n", "backend", FORWARD_EXIT),
    ("forward: route to the backend (cached)", "\tif (kept->backend != backend || kept->former.previous",
     "plan->next_hop.ifindex", FORWARD_EXIT),
    ("forward: encapsulation MAC (SipHash-2-4 from the route's state; or the flow's kept one)", "\tplan->farm_address = fwd->farm_address;\n",
     "plan->mac", FORWARD_EXIT),
)
WHOLE = "the whole program"


def variant_sources(directory: Path) -> dict[str, Path]:
    """One bpf directory per stage (the stages named twice have a line in each hook), and the program as
    it is."""
    source = (bpf_dir() / "front.bpf.c").read_text()
    names = list(dict.fromkeys(stage for stage, *_ in STAGES))
    dirs = {}
    for number, name in enumerate(names, 1):
        text = source
        for stage, anchor, kept, exit_ in STAGES:
            if text.count(anchor) != 1:
                raise SystemExit(f"bpf/front.bpf.c: the line {anchor.strip()!r} is not there once: move the stage")
            text = text.replace(anchor, f"\tSTOP_AFTER({names.index(stage) + 1}, {kept}, {exit_});\n" + anchor)
        text = text.replace('#include "synproxy.h"\n', f'#include "synproxy.h"\n#define STOP_STAGE {number}\n{STOP}', 1)
        dirs[name] = directory / str(number)
        dirs[name].mkdir()
        (dirs[name] / "front.bpf.c").write_text(text)
    dirs[WHOLE] = directory / "whole"
    dirs[WHOLE].mkdir()
    (dirs[WHOLE] / "front.bpf.c").write_text(source)
    for path in dirs.values():  # every header: the build cache hashes them all (synproxy/bpf/loading.py)
        for header in bpf_dir().glob("*.h"):
            shutil.copy(header, path)
    return dirs


def measure(runs: int, repetitions: int, program: str, syn_reply: str) -> dict[tuple[str, str], list[float]]:
    policy, schedule = policy_and_schedule()
    policy = dataclasses.replace(policy, syn_reply=syn_reply)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch, cost_namespace() as name:
        loaded = {}
        try:
            for stage, directory in variant_sources(Path(scratch)).items():
                os.environ["SYNPROXY_BPF_DIR"] = str(directory)
                loaded[stage] = FastPath(build_object("front"))
                with netns.inside(name):  # the route back proved from the routing the runs look routes up in
                    loaded[stage].watch_routes_back()
                loaded[stage].configure(policy, schedule)
            for _ in range(repetitions):
                frames = packets(policy, schedule, time.time())
                for stage, fast_path in loaded.items():
                    prog_fd = fast_path.xdp_prog_fd if program == "xdp" else fast_path.prog_fd
                    for kind in KINDS:
                        results.setdefault((stage, kind), []).append(
                            per_run(name, prog_fd, ETHERNET + frames[kind], runs))
        finally:
            os.environ.pop("SYNPROXY_BPF_DIR", None)
            for fast_path in loaded.values():
                fast_path.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000, help="runs per variant, kind and repetition")
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--program", choices=("xdp", "tc"), default="xdp")
    parser.add_argument("--syn-reply", choices=("route", "ingress"), default="route")
    args = parser.parse_args()
    results = measure(args.runs, args.repetitions, args.program, args.syn_reply)
    print(f"ns per packet inside the {args.program} program, stopped after each stage ({args.runs} runs x "
          f"{args.repetitions}, syn_reply {args.syn_reply}): median (min-max)")
    for kind in KINDS:
        print(f"  {kind}")
        path = "SYN:" if kind == "syn_answered" else "forward:"
        for stage in dict.fromkeys(stage for stage, _ in results):
            if ":" in stage and not stage.startswith(path):
                continue
            values = results[stage, kind]
            print(f"    {stage:54} {statistics.median(values):6.0f} ({min(values):.0f}-{max(values):.0f})")


if __name__ == "__main__":
    main()
