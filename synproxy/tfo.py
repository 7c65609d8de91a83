"""TCP Fast Open across the farm: the keys every node derives from the master secret, and the cookie a
backend's kernel makes with them. Pure functions; docs/cookie.md ("TCP Fast Open") specifies them and
tests/vectors/tfo.json pins them.

A TFO cookie (RFC 7413) is valid only on a server holding the key that made it, so every backend behind
a VIP needs the same key, rotated in step, and a front that hands out cookies must compute them as those
backends' kernels do. No messages pass: as the cookie salt, each key comes from HKDF over the master
secret and a time counter (the way tofurkey derives TFO keys).
"""

from __future__ import annotations

import functools

from siphash24 import siphash24

from synproxy.salt import derive_key, epoch_at

TFO_KEY_INFO_PREFIX = b"synproxy-tfo-key-v1"
TFO_KEY_BYTES = 16            # TCP_FASTOPEN_KEY_LENGTH: one siphash_key_t
# Long, so that a client's cookie outlives many visits (tofurkey's default interval); a cookie lives one
# to two periods (docs/cookie.md).
DEFAULT_KEY_PERIOD_SECONDS = 86400.0
# net.ipv4.tcp_fastopen bits (include/net/tcp.h): TFO_SERVER_ENABLE lets listeners that asked for TFO
# (setsockopt TCP_FASTOPEN) accept it.
TFO_SERVER_ENABLE = 0x2


@functools.lru_cache(maxsize=8)
def derive_tfo_key(secret: bytes, key_period: int) -> bytes:
    """The 16-byte TFO key of key period number ``key_period`` (cached: asked for on every refresh)."""
    return derive_key(secret, TFO_KEY_INFO_PREFIX + key_period.to_bytes(8, "big"))


def fastopen_keys(secret: bytes, now: float, period: float) -> tuple[bytes, bytes]:
    """(primary, backup) at unix time ``now``: the current key period's key, which makes cookies, and
    the previous period's, which the kernel still accepts. So a cookie made during period N is accepted
    during N and N+1 and refused from N+2 on."""
    current = epoch_at(now, period)
    return derive_tfo_key(secret, current), derive_tfo_key(secret, max(0, current - 1))


def fastopen_cookie(key: bytes, saddr: bytes, daddr: bytes) -> bytes:
    """The cookie Linux sends a client at ``saddr`` that reached ``daddr`` (the SYN's source and
    destination, 4 or 16 bytes each): SipHash-2-4 of the two addresses under the key, its 64-bit output
    in little-endian byte order (``__tcp_fastopen_cookie_gen_cipher``: ``cpu_to_le64(siphash(&saddr,
    sizeof saddr + sizeof daddr, key))``; the kernel loads the key as two little-endian 64-bit words,
    SipHash's own convention)."""
    return siphash24(saddr + daddr, key=key).digest()


def sysctl_key_value(keys: tuple[bytes, ...]) -> str:
    """``net.ipv4.tcp_fastopen_key`` for these keys, primary first, as the kernel prints it: per key
    four 32-bit words in hex, each word the key's next four bytes read little-endian (the kernel stores
    ``cpu_to_le32`` of each word it scans), keys separated by a comma."""
    return ",".join("-".join(f"{int.from_bytes(key[i:i + 4], 'little'):08x}" for i in range(0, TFO_KEY_BYTES, 4))
                    for key in keys)
