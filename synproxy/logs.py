"""Structured logs: one JSON object per line on stderr, with an ISO 8601 time (UTC) and a level. Callers
pass fields, never secrets. A fatal error is one such line too (fatal()), so a log pipeline reads a
node's last words like the rest."""

from __future__ import annotations

import datetime
import json
import sys

# Events that are not routine, by level; every other event is "info". One table here rather than a
# level at each call site: an event's name already says what happened.
LEVELS = {
    **dict.fromkeys(("config_warning", "sysctl_warning", "data_plane_unavailable", "restart_required",
                     "secrets_unchecked", "bgp_session_down", "front_draining", "xdp_leftover_detached",
                     "under_attack", "vip_port_counters_partial", "libbpf_warning"),
                    "warning"),
    **dict.fromkeys(("packet_failed", "config_reload_failed", "kernel_path_refresh_failed"), "error"),
    "fatal": "fatal",
}


def log(event: str, **fields) -> None:
    """One write per record, newline included: a front's workers share its stderr, and print()'s separate
    newline let two workers' lines interleave into one."""
    record = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
              "level": LEVELS.get(event, "info"), "event": event, **fields}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()


def fatal(message: str) -> None:
    """The error that stops a node, as its last log line (the caller exits non-zero)."""
    log("fatal", error=message)
