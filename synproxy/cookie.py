"""The SYN cookie: a 32-bit ISN that carries the client's SYN options under a 22-bit SipHash MAC.

Layout, MAC input and epochs are specified in docs/cookie.md; tests/vectors/cookies.json pins them for
both this module and the backend's BPF program. Pure functions over integers and bytes.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from siphash24 import siphash24

from synproxy.packet import V4_MAPPED_PREFIX
from synproxy.salt import EPOCH_SLOTS, SaltSchedule

MSS_TABLE = {4: (536, 1300, 1440, 1460), 6: (1220, 1420, 1440, 8940)}
WSCALE_MAX = 14
WSCALE_NONE = 15
DATA_BITS = 10
DATA_MASK = (1 << DATA_BITS) - 1
MAC_BITS = 32 - DATA_BITS
MAC_MASK = (1 << MAC_BITS) - 1
_MSS_MASK = 0x3
_ECN_BIT = 1 << 2
_SACK_BIT = 1 << 3
_WSCALE_SHIFT = 4
_EPOCH_SHIFT = 8

_MAC_INPUT = struct.Struct("!16s16sHHIIHxx")
_MAC_INPUT_V4 = struct.Struct("!12s4s12s4sHHIIHxx")  # the same 48 bytes, the mapped prefixes packed apart
MAC_INPUT_BYTES = _MAC_INPUT.size


class SynOptions(NamedTuple):
    """What a client's SYN negotiated, as far as the cookie remembers it (a tuple: cheap to build)."""

    mss: int
    wscale: int | None
    sack: bool
    ecn: bool


class Reject(enum.Enum):
    """Why an ACK's cookie did not validate (a metric label)."""

    EXPIRED_EPOCH = "expired_epoch"
    BAD_MAC = "bad_mac"


def mss_index(family: int, mss: int | None) -> int:
    """Index of the largest table MSS not above the client's (0 when it is smaller than all or absent).

    Searched from the top: most clients offer at least the largest entry, so one comparison.
    """
    if mss is None:
        return 0
    table = MSS_TABLE[family]
    index = len(table) - 1
    while index and mss < table[index]:
        index -= 1
    return index


def encode_data(family: int, options: SynOptions, epoch: int) -> int:
    """The cookie's 10 data bits: epoch mod 4, window scale code, SACK, ECN, MSS index.

    ``options`` may be any (mss, wscale, sack, ecn) tuple: the front passes a plain one.
    """
    mss, wscale, sack, ecn = options
    wscale_code = WSCALE_NONE if wscale is None else min(WSCALE_MAX, wscale)
    return ((epoch % EPOCH_SLOTS) << _EPOCH_SHIFT | wscale_code << _WSCALE_SHIFT
            | (_SACK_BIT if sack else 0) | (_ECN_BIT if ecn else 0) | mss_index(family, mss))


def decode_data(family: int, data: int) -> SynOptions:
    """Options from the data bits; MSS is the table value, so it never exceeds what the client sent."""
    wscale_code = (data >> _WSCALE_SHIFT) & 0xF
    return SynOptions(mss=MSS_TABLE[family][data & _MSS_MASK],
                      wscale=None if wscale_code == WSCALE_NONE else wscale_code,
                      sack=bool(data & _SACK_BIT), ecn=bool(data & _ECN_BIT))


def data_epoch_bits(data: int) -> int:
    return (data >> _EPOCH_SHIFT) & (EPOCH_SLOTS - 1)


def mac_input(saddr: bytes, daddr: bytes, sport: int, dport: int, client_isn: int, epoch: int,
              data: int) -> bytes:
    """The 48 bytes the MAC covers; IPv4 addresses enter as IPv4-mapped IPv6 (::ffff:a.b.c.d)."""
    if len(saddr) == 4:
        return _MAC_INPUT_V4.pack(V4_MAPPED_PREFIX, saddr, V4_MAPPED_PREFIX, daddr, sport, dport, client_isn,
                                  epoch & 0xFFFFFFFF, data)
    return _MAC_INPUT.pack(saddr, daddr, sport, dport, client_isn, epoch & 0xFFFFFFFF, data)


def cookie_mac(salt: bytes, message: bytes) -> int:
    """Low 22 bits of SipHash-2-4 (the 64-bit output read little-endian, as the kernel's siphash)."""
    return siphash24(message, key=salt).intdigest() & MAC_MASK


def make_cookie(salt: bytes, epoch: int, saddr: bytes, daddr: bytes, sport: int, dport: int,
                client_isn: int, options: SynOptions) -> int:
    """The ISN for a SYN-ACK answering a SYN from ``saddr:sport`` to ``daddr:dport``."""
    data = encode_data(4 if len(saddr) == 4 else 6, options, epoch)
    message = mac_input(saddr, daddr, sport, dport, client_isn, epoch, data)
    return cookie_mac(salt, message) << DATA_BITS | data


def check_cookie(schedule: SaltSchedule, now: float, saddr: bytes, daddr: bytes, sport: int,
                 dport: int, client_isn: int, cookie: int) -> SynOptions | Reject:
    """Validate ``cookie`` (an ACK's ack number minus one) against every accepted epoch and secret.

    The epoch bits name one accepted epoch, so this costs one MAC per secret, never a search.
    """
    data = cookie & DATA_MASK
    candidate = schedule.salts_for_bits(data_epoch_bits(data), now)
    if candidate is None:
        return Reject.EXPIRED_EPOCH
    epoch, salts = candidate
    message = mac_input(saddr, daddr, sport, dport, client_isn, epoch, data)
    mac = cookie >> DATA_BITS
    for salt in salts:
        if cookie_mac(salt, message) == mac:
            return decode_data(4 if len(saddr) == 4 else 6, data)
    return Reject.BAD_MAC
