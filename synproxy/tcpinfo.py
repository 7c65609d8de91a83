"""Read what a connection negotiated from the kernel's TCP_INFO (struct tcp_info, linux/tcp.h)."""

from __future__ import annotations

import socket
import struct

_HEAD = struct.Struct("=BBBBBBBBIIII")  # state … options, wscales, flags, rto, ato, snd_mss, rcv_mss
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE, TCPI_OPT_ECN = 1, 2, 4, 8


def negotiated(sock: socket.socket) -> dict:
    """The options the kernel uses on ``sock``: timestamps, SACK, window scales, ECN, MSS."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _HEAD.size)
    _state, _ca, _retx, _probes, _backoff, options, wscales, _flags, _rto, _ato, snd_mss, rcv_mss = \
        _HEAD.unpack(raw)
    wscale_ok = bool(options & TCPI_OPT_WSCALE)
    return {
        "timestamps": bool(options & TCPI_OPT_TIMESTAMPS),
        "sack": bool(options & TCPI_OPT_SACK),
        "wscale": wscale_ok,
        "snd_wscale": wscales & 0xF if wscale_ok else None,
        "rcv_wscale": wscales >> 4 if wscale_ok else None,
        "ecn": bool(options & TCPI_OPT_ECN),
        "snd_mss": snd_mss,
        "rcv_mss": rcv_mss,
    }
