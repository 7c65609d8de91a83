"""4-tuple reuse behind the fronts (docs/backend.md), the fallback: the backend program recycles a TIME_WAIT
socket itself, with an in-window RST ("TIME-WAIT assassination"), but the kernel ignores that RST where
net.ipv4.tcp_rfc1337=1. Then the program reports, through its `time_wait` ring buffer, each validated
segment of the new connection that met the TIME_WAIT socket, and drops it; this thread destroys that socket
and re-injects the segments.

The kernel recycles such a socket itself when the SYN arrives (tcp_timewait_state_process), but behind
the fronts the backend sees only the ACK: the kfunc's connection cannot be inserted next to the TIME_WAIT
socket, and tc cannot remove it. sock_diag's SOCK_DESTROY can (CAP_NET_ADMIN; it works for TIME_WAIT
sockets). The socket is first looked up by its tuple and destroyed by its cookie, so only that TIME_WAIT
socket is, never a connection the same tuple has since made. Then the dropped segment (the event carries
it, and what its encapsulation held) is sent again, encapsulated as it arrived, on the loopback device
through a packet socket: it comes back in at the loopback device's ingress, where the backend program is
attached too, passes the same checks and makes the connection (or reaches the one the client's next
segment made meanwhile). The client sees no loss: its ACK and its data right behind it (an HTTP request)
are both delivered, about a millisecond late, instead of the data at its retransmission (200 ms). On IPv4
a strict reverse-path filter on the loopback device drops what is re-injected (docs/backend.md).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from typing import NamedTuple

from synproxy.bpf.libbpf import Map, RingBuffer
from synproxy.logs import log
from synproxy.packet import PROTO_UDP, MalformedPacket, build_ip_header, tcp_checksum_completed

EVENT = struct.Struct("=16s16s2s2sIIBBH4s4s2s2s20s")  # struct time_wait_event up to its packet
ETH_P_IP = 0x0800
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 4, 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 0x1, 0x4, 2
TCP_SYN_RECV, TCP_TIME_WAIT, TCP_LISTEN = 3, 6, 10  # include/net/tcp_states.h; a request socket is SYN_RECV
_NLMSG = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBxI2s2s16s16sIQ")  # struct inet_diag_req_v2 with its inet_diag_sockid
_NO_COOKIE = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE in both words
_ANSWER = struct.Struct("=BB2x2s2s16s16sIQ")     # struct inet_diag_msg up to the socket's cookie
POLL_MS = 200  # how long one poll waits: the thread sees a stop request within this
# How long reports of the same tuple may still be on their way (the request a client sends right behind
# its ACK, ~0.1 ms later in the lab): read before destroying, so that data meets the TIME_WAIT socket and
# is re-injected after the ACK. Arriving after the destroy instead, it would make a connection itself,
# racing the re-injected ACK's on another CPU: the loser of the two finds the winner's socket in the
# hash and is dropped, and the client sends it again 200 ms later (1-2 of 88 reconnects in the lab).
SETTLE_SECONDS = 0.001


class TimeWaitEvent(NamedTuple):
    family: int
    client: bytes  # 4 or 16 bytes
    vip: bytes
    client_port: bytes  # network order
    vip_port: bytes
    seq: int  # the segment's: the client's ISN + 1
    ack: int  # the segment's: the cookie + 1
    reinjected: bool = False  # it came in on the loopback device: re-injected once already
    front: bytes = b""  # the encapsulation's outer source and destination addresses (IPv4)
    backend: bytes = b""
    source_port: bytes = b""  # its UDP ports, network order
    encap_port: bytes = b""
    header: bytes = b""  # the synproxy header as received, MAC included
    packet: bytes = b""  # the inner IP packet, or nothing when it was larger than the program copies

    @classmethod
    def unpack(cls, record: bytes) -> TimeWaitEvent:
        (saddr, daddr, sport, dport, seq, ack, family, reinjected, length, front, backend, source_port, encap_port,
         header) = EVENT.unpack_from(record)
        size = 4 if family == 4 else 16
        return cls(family, saddr[-size:], daddr[-size:], sport, dport, seq, ack, bool(reinjected), front, backend,
                   source_port, encap_port, header, bytes(record[EVENT.size:EVENT.size + length]))


def _diag(sock: socket.socket, kind: int, event: TimeWaitEvent, cookie: int) -> bytes | int:
    """One sock_diag request about the event's server-side socket (local VIP:port, remote client:port):
    the answer's payload, or an errno (0 for a plain acknowledgment)."""
    family = socket.AF_INET if event.family == 4 else socket.AF_INET6
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF, event.vip_port, event.client_port,
                            event.vip.ljust(16, b"\0"), event.client.ljust(16, b"\0"), 0, cookie)
    flags = NLM_F_REQUEST | (NLM_F_ACK if kind == SOCK_DESTROY else 0)
    sock.send(_NLMSG.pack(_NLMSG.size + len(request), kind, flags, 0, 0) + request)
    answer = sock.recv(65536)
    _length, answer_kind, _flags, _seq, _pid = _NLMSG.unpack_from(answer)
    if answer_kind == NLMSG_ERROR:
        return -struct.unpack_from("=i", answer, _NLMSG.size)[0]
    return answer[_NLMSG.size:]


def _socket_of(sock: socket.socket, event: TimeWaitEvent) -> tuple[int, int] | None:
    """The state and cookie of the socket the tuple's segments reach (a listener when no connection
    holds the tuple), or None."""
    found = _diag(sock, SOCK_DIAG_BY_FAMILY, event, _NO_COOKIE)
    if found == errno.ENOENT:
        return None
    if isinstance(found, int):
        raise OSError(found, f"sock_diag lookup: {os.strerror(found)}")
    _family, state, *_, cookie = _ANSWER.unpack_from(found)
    return state, cookie


def connected(sock: socket.socket, event: TimeWaitEvent) -> bool:
    """Does a socket other than a listener hold the event's tuple?"""
    found = _socket_of(sock, event)
    return found is not None and found[0] != TCP_LISTEN


def destroy_recycled(sock: socket.socket, event: TimeWaitEvent) -> bool:
    """Destroy the socket the event's segment met, a TIME_WAIT or a stale request socket (the program's
    `recycle`), and nothing else: True when it was there and is gone."""
    found = _socket_of(sock, event)
    if found is None or found[0] not in (TCP_TIME_WAIT, TCP_SYN_RECV):
        return False  # gone, or the tuple's connection is a new one
    cookie = found[1]
    destroyed = _diag(sock, SOCK_DESTROY, event, cookie)
    if destroyed not in (0, errno.ENOENT):  # EOPNOTSUPP: a kernel without CONFIG_INET_DIAG_DESTROY
        raise OSError(destroyed, f"sock_diag destroy: {os.strerror(destroyed)}")
    return destroyed == 0


def reinjection_frame(event: TimeWaitEvent) -> bytes | None:
    """The dropped segment encapsulated again as it arrived (outer addresses and ports, the header with its
    MAC), in an Ethernet frame to the loopback device's address (zeros: another makes the frame
    PACKET_OTHERHOST, which IP drops); None when it cannot be re-injected: too large to be copied,
    re-injected once already, or damaged."""
    if event.reinjected or not event.packet:
        return None
    try:
        inner = tcp_checksum_completed(event.packet)
    except MalformedPacket:
        return None
    if inner is None:
        return None
    udp_length = 8 + len(event.header) + len(inner)
    return (bytes(12) + ETH_P_IP.to_bytes(2, "big") + build_ip_header(event.front, event.backend, PROTO_UDP, udp_length)
            + event.source_port + event.encap_port + udp_length.to_bytes(2, "big") + bytes(2) + event.header + inner)


class TimeWaitRecycler:
    """The thread that reads the program's `time_wait` ring buffer and recycles what it reports: each
    report's TIME_WAIT socket destroyed (once: the data right behind an ACK finds it gone), then its
    segment re-injected, in the order the program reported them (an ACK before the data behind it)."""

    def __init__(self, ring_map: Map):
        try:
            self.diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            self.loopback = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only
        except PermissionError:
            raise PermissionError("the TIME_WAIT recycler needs CAP_NET_RAW for its packet socket "
                                  "(docs/backend.md, \"4-tuple reuse\")") from None
        self.reported: list[TimeWaitEvent] = []
        self.ring = RingBuffer(ring_map, self._on_record)
        self.recycled = self.reinjected = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="time-wait-recycler", daemon=True)

    def start(self) -> TimeWaitRecycler:
        self._thread.start()
        return self

    def _on_record(self, record: bytes) -> None:
        self.reported.append(TimeWaitEvent.unpack(record))

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.ring.poll(POLL_MS) or self.reported:
                self.recycle()

    def recycle(self) -> None:
        """Let reports still on their way arrive, then destroy the TIME_WAIT socket each report names, if it
        is still there, and send its segment again. A segment that cannot be re-injected is left to the
        client's retransmission."""
        time.sleep(SETTLE_SECONDS)
        self.ring.poll(0)
        events, self.reported = self.reported, []
        for event in events:
            try:
                if destroy_recycled(self.diag, event):
                    self.recycled += 1
                frame = reinjection_frame(event)
                if frame is not None:
                    self.loopback.sendto(frame, ("lo", ETH_P_IP))
                    self.reinjected += 1
            except OSError as error:
                self._failed(error)

    def _failed(self, error: OSError) -> None:
        """A refused destroy or re-injection: the client's own retransmission tries again."""
        self.failed += 1
        log("time_wait_recycle_failed", error=f"{errno.errorcode.get(error.errno, error.errno)}: {error}")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.ring.close()
        for sock in (self.diag, self.loopback):
            sock.close()
