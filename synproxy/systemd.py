"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (deploy/systemd/).

The units are Type=notify: a node says READY=1 once its data plane is attached and its loop runs (not
when the process starts), and WATCHDOG=1 at every heartbeat of that loop, so systemd restarts a node
whose loop stopped (WatchdogSec). Without $NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self):
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # "@": an abstract socket
        self.sock: socket.socket | None = None
        self.ready_sent = False

    def notify(self, state: str) -> None:
        if not self.address:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto(state.encode(), self.address)
        except OSError:
            pass  # systemd went away or restarts: the node keeps running; the watchdog says the rest

    def beat(self, status: str) -> None:
        """Every heartbeat of the loop: READY=1 the first time, then WATCHDOG=1, with a STATUS line."""
        self.notify(("WATCHDOG=1" if self.ready_sent else "READY=1") + f"\nSTATUS={status}")
        self.ready_sent = True
