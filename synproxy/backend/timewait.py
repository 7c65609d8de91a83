"""4-tuple reuse behind the fronts (docs/backend.md): the backend program reports, through its `time_wait`
ring buffer, each validated handshake ACK that met a TIME_WAIT socket RFC 6191 would recycle for a SYN;
this thread destroys that socket and makes the client repeat its ACK.

The kernel recycles such a socket itself when the SYN arrives (tcp_timewait_state_process), but behind
the fronts the backend sees only the ACK: the kfunc's connection cannot be inserted next to the TIME_WAIT
socket, and tc cannot remove it. sock_diag's SOCK_DESTROY can (CAP_NET_ADMIN; it works for TIME_WAIT
sockets). The socket is first looked up by its tuple and destroyed by its cookie, so only that TIME_WAIT
socket is, never a connection the same tuple has since made. Then, unless the client sent data behind
its ACK, a bare ACK from the VIP one below what the client expects (a keepalive probe's sequence
number) makes the client's TCP answer with a duplicate ACK (RFC 793's answer to an old segment): the
same sequence and acknowledgment numbers as its handshake ACK, which the fronts validate again and the
backend now turns into the connection.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from typing import NamedTuple

from synproxy.bpf.libbpf import Map, RingBuffer
from synproxy.logs import log
from synproxy.packet import ACK, build_tcp_packet

EVENT = struct.Struct("=16s16s2s2sIIBB2x")  # struct time_wait_event
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 4, 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 0x1, 0x4, 2
TCP_TIME_WAIT, TCP_LISTEN = 6, 10  # include/net/tcp_states.h
_NLMSG = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBxI2s2s16s16sIQ")  # struct inet_diag_req_v2 with its inet_diag_sockid
_NO_COOKIE = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE in both words
_ANSWER = struct.Struct("=BB2x2s2s16s16sIQ")     # struct inet_diag_msg up to the socket's cookie
POLL_MS = 200  # how long one poll waits: the thread sees a stop request within this
# After destroying, how long reports of the same tuple may still be on their way (a segment the program
# handled on another CPU while the socket was being destroyed): read before deciding on the probe.
SETTLE_SECONDS = 0.001


class TimeWaitEvent(NamedTuple):
    family: int
    client: bytes  # 4 or 16 bytes
    vip: bytes
    client_port: bytes  # network order
    vip_port: bytes
    seq: int  # the ACK's: the client's ISN + 1
    ack: int  # the ACK's: the cookie + 1
    data: bool = False  # the segment carried data

    @classmethod
    def unpack(cls, record: bytes) -> TimeWaitEvent:
        saddr, daddr, sport, dport, seq, ack, family, data = EVENT.unpack(record[:EVENT.size])
        size = 4 if family == 4 else 16
        return cls(family, saddr[-size:], daddr[-size:], sport, dport, seq, ack, bool(data))

    @property
    def flow(self) -> tuple:
        return self.family, self.client, self.vip, self.client_port, self.vip_port


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


def destroy_time_wait(sock: socket.socket, event: TimeWaitEvent) -> bool:
    """Destroy the event's TIME_WAIT socket, and nothing else: True when it was there and is gone."""
    found = _socket_of(sock, event)
    if found is None or found[0] != TCP_TIME_WAIT:
        return False  # gone, or the tuple's connection is a new one
    cookie = found[1]
    destroyed = _diag(sock, SOCK_DESTROY, event, cookie)
    if destroyed not in (0, errno.ENOENT):  # EOPNOTSUPP: a kernel without CONFIG_INET_DIAG_DESTROY
        raise OSError(destroyed, f"sock_diag destroy: {os.strerror(destroyed)}")
    return destroyed == 0


def elicit_ack(event: TimeWaitEvent) -> bytes:
    """The probe that makes the client repeat its ACK: from the VIP, sequence number the cookie (one below
    the client's next expected), no payload, acknowledging what the ACK carried."""
    return build_tcp_packet(event.vip, event.client, int.from_bytes(event.vip_port, "big"),
                            int.from_bytes(event.client_port, "big"), (event.ack - 1) & 0xFFFFFFFF, event.seq,
                            ACK, 0)


class TimeWaitRecycler:
    """The thread that reads the program's `time_wait` ring buffer and recycles what it reports.

    The probe is sent only when the client has sent nothing behind its ACK: a client with data in flight
    answers it with its next sequence number, which carries no cookie, and the listener would reset the
    connection. Such a client sends its data again after its retransmission timeout, and that segment,
    validated like its ACK, makes the connection."""

    def __init__(self, ring_map: Map):
        self.diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.raw = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                    6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)}
        self.reported: list[TimeWaitEvent] = []
        self.ring = RingBuffer(ring_map, self._on_record)
        self.recycled = self.probed = self.failed = 0
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
        """Destroy what the reports name, let reports still on their way arrive, then probe the clients
        that sent nothing behind their ACK."""
        events, self.reported = self.reported, []
        destroyed = {}
        for event in events:
            try:
                if event.flow not in destroyed and destroy_time_wait(self.diag, event):
                    destroyed[event.flow] = event
            except OSError as error:
                self._failed(error)
        if not destroyed:
            return
        self.recycled += len(destroyed)
        time.sleep(SETTLE_SECONDS)
        self.ring.poll(0)  # the late reports stay for the next round: other tuples' are new work
        with_data = {event.flow for event in events + self.reported if event.data}
        for flow, event in destroyed.items():
            try:
                # Data behind the ACK, dropped (the client sends it again) or already the connection: a
                # probe then would only reach a later state of the tuple.
                if flow in with_data or connected(self.diag, event):
                    continue
                self.raw[event.family].sendto(elicit_ack(event), (str(ipaddress.ip_address(event.client)), 0))
                self.probed += 1
            except OSError as error:
                self._failed(error)

    def _failed(self, error: OSError) -> None:
        """A refused destroy or probe: the client's own retransmission tries again."""
        self.failed += 1
        log("time_wait_recycle_failed", error=f"{errno.errorcode.get(error.errno, error.errno)}: {error}")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.ring.close()
        for sock in (self.diag, *self.raw.values()):
            sock.close()
