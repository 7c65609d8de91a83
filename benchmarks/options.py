"""The bench's command-line options, kept free of heavy imports: `synproxy --help` builds them."""

from __future__ import annotations

import argparse
from pathlib import Path

FLAT_OUT = 0  # an offered rate of 0: as fast as the generator goes
# The SYN flood: one paced rate (what legitimate clients feel under a moderate flood; the BPF programs'
# time per packet off saturation) and unpaced, where the contender CPU is busiest and its cost per
# SYN is read. Paced rates' CPU time read the contender CPU's wake-ups more than its work (the sink,
# which does nothing, 2.2-18 µs per packet at 10-80k/s over one run), so 10k, 20k and 80k went:
# benchmarks/README.md, Method.
FULL_RATES = (40_000, FLAT_OUT)
FLOOD_RATES = (FLAT_OUT,)  # the ACK and mixed floods: the targets are at the generator's maximum
QUICK_RATES = (40_000, FLAT_OUT)
QUICK_FLOOD_RATES = (FLAT_OUT,)
SCENARIOS = ("syn", "ack", "mixed", "upload", "connections", "tfo")  # benchmarks/connection_rate.py, fastopen.py


def rate_list(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(FLAT_OUT if part.strip() == "max" else int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of packets/s or 'max'") from None
    if any(rate < 0 or rate > 10_000_000 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be between 0 and 10000000 packets/s")
    return rates


def scenario_list(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(","))
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0] if unknown else text!r}; "
                                         f"choose from {','.join(SCENARIOS)}")
    return tuple(name for name in SCENARIOS if name in chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one repetition of 0.8 s steps, fewer rates, a 50 MB upload (about a minute and a half)")
    parser.add_argument("--scenarios", type=scenario_list,
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--rates", type=rate_list,
                        help="offered packets/s of every flood, comma-separated, 'max' = unpaced "
                             "(default: SYN 40k,max; ACK and mixed max; the sink and the floors only the highest)")
    parser.add_argument("--seconds", type=float,
                        help="flood duration per step (default 10, quick 0.8); an idle step of half that precedes each")
    parser.add_argument("--repetitions", type=int,
                        help="interleaved repetitions, the contenders' order rotated each time (default 3, quick 1)")
    parser.add_argument("--contenders", help="comma-separated subset (names in benchmarks/README.md; the sink "
                                             "is always measured: it is the floor of the contender CPU's cost)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/latest"),
                        help="folder for results.json, results.md and the plots")
    parser.add_argument("--profile", action="store_true",
                        help="sample the front with py-spy during its highest-rate step")
