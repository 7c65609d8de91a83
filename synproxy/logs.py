"""Structured logs: one JSON object per line on stderr. Callers pass fields, never secrets."""

from __future__ import annotations

import json
import sys
import time


def log(event: str, **fields) -> None:
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(record, default=str), file=sys.stderr, flush=True)
