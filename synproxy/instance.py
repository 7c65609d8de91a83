"""One instance of each role per network namespace (claimed by binding an abstract unix socket), and
what this process may do.

A role's resources are per namespace (the raw table's rules, the protected VIPs and ports, a tc slot), so
a second instance there would take them over, and tear them down when it exits. Abstract socket names
belong to the network namespace and vanish with the process that bound them: a crashed instance leaves
no stale lock, and instances in other namespaces never collide.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def has_capability(bit: int) -> bool:
    """Whether this process holds the capability (its effective set): root whose capabilities were
    dropped (a container, `setpriv --bounding-set`) is refused as a non-root user is."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


class AlreadyRunning(RuntimeError):
    """Another instance of the role holds this namespace; the message names it for the operator."""


def claim(role: str) -> socket.socket:
    """The lock for ``role`` in this network namespace; held as long as the returned socket is open."""
    name = f"synproxy-{role}"
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0{name}")
    except OSError as error:
        lock.close()
        if error.errno != errno.EADDRINUSE:
            raise
        pid = holder(role)
        raise AlreadyRunning(f"another synproxy {role} runs in this network namespace"
                             f"{f' (pid {pid})' if pid else ''}: stop it first") from None
    return lock


def holder(role: str) -> int | None:
    """The process running ``role`` in this network namespace (the one that bound its abstract socket),
    found through the socket's inode; None when none runs or it is not visible."""
    name = f"synproxy-{role}"
    inodes = {fields[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if len(fields := line.split()) >= 8 and fields[7] == f"@{name}"}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(fd_dir.parent.name)
        except OSError:  # the process ended, or is not ours to look at
            continue
    return None
