"""The bench's command-line options, kept free of heavy imports: `synproxy --help` builds them."""

from __future__ import annotations

import argparse
from pathlib import Path

FLAT_OUT = 0  # an offered rate of 0: as fast as the generator goes
FULL_RATES = (10_000, 20_000, 40_000, 80_000, FLAT_OUT)
QUICK_RATES = (20_000, FLAT_OUT)


def rate_list(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(FLAT_OUT if part.strip() == "max" else int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of SYN/s or 'max'") from None
    if any(rate < 0 or rate > 10_000_000 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be between 0 and 10000000 SYN/s")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="two rates, 2 s each (under two minutes)")
    parser.add_argument("--rates", type=rate_list, help="offered SYN/s, comma-separated, 'max' = unpaced")
    parser.add_argument("--seconds", type=float, help="flood duration per step (default 4, quick 2)")
    parser.add_argument("--contenders", help="comma-separated subset (names in benchmarks/README.md; the sink "
                                             "is always measured: the others' CPU figures are net of it)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/latest"),
                        help="folder for results.json, results.md and the plots")
    parser.add_argument("--profile", action="store_true",
                        help="sample the front with py-spy during its highest-rate step")
