"""The front's BGP sessions: announce the VIPs to the routers while the front is ready, withdraw them
when it is not (docs/front.md, "Announcing the VIPs").

The speaker lives in the front's own loop, not in a separate daemon, so the announcement shares the
front's fate: a front killed outright has its sessions closed by the kernel (the router withdraws at
once), and a loop that stops (frozen, stuck) stops sending keepalives, so the router's hold timer
(front.bgp.hold_time_seconds, 3 s by default) withdraws it. A daemon beside the front would keep
announcing a front that no longer answers. The loop calls tick() at every housekeeping (0.5 s); every
socket is non-blocking, so a dead router never holds the packet loop.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import time

from synproxy import bgp
from synproxy.logs import log
from synproxy.netlink import global_ipv6_beside

BGP_PORT = 179
CONNECT_RETRY_SECONDS = 1.0


class Session:
    """One peer: idle -> connecting -> open_sent -> open_confirm -> established."""

    def __init__(self, peer: ipaddress.IPv4Address, settings, networks: list[bgp.Network]):
        self.peer, self.settings, self.networks = peer, settings, networks
        self.sock: socket.socket | None = None
        self.state = "idle"
        self.announced = False
        self.retry_at = 0.0
        self.reader = bgp.Reader()
        self.hold_time = settings.hold_time_seconds
        self.four_octet_as = False
        self.received_at = self.sent_at = 0.0
        self.local: ipaddress.IPv4Address | None = None
        self.next_hop6: ipaddress.IPv6Address | None = None

    def tick(self, announce: bool, now: float) -> None:
        try:
            self._tick(announce, now)
        except (OSError, bgp.BgpError) as error:
            self.reset(now, f"{type(error).__name__}: {error}")

    def _tick(self, announce: bool, now: float) -> None:
        if self.state == "idle":
            if now < self.retry_at:
                return
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.connect_ex((str(self.peer), BGP_PORT))
            self.state, self.received_at = "connecting", now
        if self.state == "connecting":
            _, writable, _ = select.select([], [self.sock], [], 0)
            if not writable:
                if now - self.received_at > self.settings.hold_time_seconds:
                    raise OSError(errno.ETIMEDOUT, "connect timed out")
                return
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, errno.errorcode.get(code, str(code)))
            self.local = ipaddress.IPv4Address(self.sock.getsockname()[0])
            self.next_hop6 = global_ipv6_beside(self.local)
            self._send(bgp.open_message(self.settings.local_as, self.settings.hold_time_seconds, self.local), now)
            self.state, self.received_at = "open_sent", now
        self._receive(now)
        if self.state == "idle":
            return
        if self.hold_time and now - self.received_at > self.hold_time:
            self._send(bgp.notification(bgp.HOLD_TIMER_EXPIRED), now)
            raise bgp.BgpError(f"nothing from the router for {self.hold_time} s (hold timer)")
        if self.state == "established" and announce != self.announced:
            networks = self._announceable()
            self._send(b"".join(bgp.announcements(networks, self.settings.local_as, self.four_octet_as, self.local,
                                                  self.next_hop6) if announce else bgp.withdrawals(networks)), now)
            self.announced = announce
            log("bgp_announced" if announce else "bgp_withdrawn", peer=str(self.peer),
                prefixes=[str(n) for n in networks])
        if self.state in ("open_confirm", "established") and self.hold_time and \
                now - self.sent_at >= self.hold_time / 3:
            self._send(bgp.keepalive(), now)

    def _announceable(self) -> list[bgp.Network]:
        """The VIPs this session can carry: IPv6 ones need an IPv6 address beside the session's (the next hop)."""
        return [n for n in self.networks if n.version == 4 or self.next_hop6 is not None]

    def _receive(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                raise OSError(errno.ECONNRESET, "the router closed the session")
            self.received_at = now
            for kind, body in self.reader.feed(data):
                self._on_message(kind, body, now)

    def _on_message(self, kind: int, body: bytes, now: float) -> None:
        if kind == bgp.OPEN and self.state == "open_sent":
            peer = bgp.parse_open(body)
            if peer.peer_as != self.settings.peer_as:
                self._send(bgp.notification(2, 2), now)  # OPEN message error: bad peer AS
                raise bgp.BgpError(f"the router is AS {peer.peer_as}, front.bgp.peer_as says {self.settings.peer_as}")
            self.hold_time = min(self.settings.hold_time_seconds, peer.hold_time)
            self.four_octet_as = peer.four_octet_as
            if bgp.AFI_IPV6 not in peer.families:
                self.next_hop6 = None
            self._send(bgp.keepalive(), now)
            self.state = "open_confirm"
        elif kind == bgp.KEEPALIVE and self.state == "open_confirm":
            self.state = "established"
            log("bgp_established", peer=str(self.peer), hold_time=self.hold_time, local=str(self.local),
                next_hop6=str(self.next_hop6) if self.next_hop6 else None)
        elif kind == bgp.NOTIFICATION:
            raise bgp.BgpError(f"the router sent NOTIFICATION {body[:2].hex()}")
        elif kind == bgp.OPEN:
            raise bgp.BgpError("OPEN out of turn")
        # UPDATEs (the router's routes) and keepalives only refresh the hold timer.

    def _send(self, data: bytes, now: float) -> None:
        if self.sock.send(data) != len(data):  # a few hundred bytes into an empty socket buffer
            raise OSError(errno.EAGAIN, "the session's send buffer is full")
        self.sent_at = now

    def reset(self, now: float, reason: str) -> None:
        if self.state != "idle" or self.sock is not None:
            log("bgp_session_down", peer=str(self.peer), state=self.state, reason=reason,
                was_announced=self.announced)
        if self.sock is not None:
            self.sock.close()
        self.sock, self.state, self.announced = None, "idle", False
        self.reader = bgp.Reader()
        self.retry_at = now + CONNECT_RETRY_SECONDS

    def close(self) -> None:
        """Withdraw (if announced) and say goodbye: Cease, administrative shutdown."""
        if self.state == "established":
            try:
                now = time.monotonic()
                if self.announced:
                    self._send(b"".join(bgp.withdrawals(self._announceable())), now)
                self._send(bgp.notification(bgp.CEASE, bgp.ADMINISTRATIVE_SHUTDOWN), now)
            except OSError:
                pass
        self.reset(time.monotonic(), "front stopping")


class Announcer:
    """A session to each router; the VIPs announced on each while ``announce`` says so."""

    def __init__(self, settings, vips, peers: list[ipaddress.IPv4Address]):
        networks = [ipaddress.ip_network(vip) for vip in vips]
        self.sessions = [Session(peer, settings, networks) for peer in peers]

    def tick(self, announce: bool, now: float) -> None:
        for session in self.sessions:
            session.tick(announce, now)

    def announced(self) -> bool:
        """Whether any router has the VIPs from this front."""
        return any(session.announced for session in self.sessions)

    def states(self) -> dict[str, dict]:
        return {str(s.peer): {"state": s.state, "announced": s.announced} for s in self.sessions}

    def close(self) -> None:
        for session in self.sessions:
            session.close()
