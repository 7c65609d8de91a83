"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran uses it.

Every front builds the same lookup table from the same backend list, so all pick the same backend
for a flow without talking to each other; removing a backend moves only the flows it had.
"""

from __future__ import annotations

import struct

from siphash24 import siphash13, siphash24

from synproxy.packet import V4_MAPPED_PREFIX
from synproxy.salt import derive_key

DEFAULT_TABLE_SIZE = 65537  # prime, much larger than any backend count (MAGLEV_TABLE_SIZE in bpf/synproxy.h)
FLOW_KEY_INFO = b"synproxy-flow-key-v1"
# The flow hash's 40-byte message: addresses in the cookie message's 16-byte form (IPv4 as ::ffff:a.b.c.d),
# ports, zeros to whole 64-bit words (flow_hash in bpf/synproxy.h).
_FLOW_MESSAGE = struct.Struct("!16s16sHH4x")
_U64 = (1 << 64) - 1


def derive_flow_key(secret: bytes) -> bytes:
    """The flow hash's key, secret so that no one outside can aim a flood at one backend by choosing
    4-tuples that hash to it. It must outlive cookie secrets (a new key re-maps every established flow):
    config.flow_secret_file pins the secret it comes from (docs/cookie.md, rotation)."""
    return derive_key(secret, FLOW_KEY_INFO)


def _hash(data: bytes, seed: int) -> int:
    return siphash24(data, key=seed.to_bytes(16, "little")).intdigest()


def build_table(backends: list[str], size: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """Lookup table of backend indexes; ``backends`` are stable names (their addresses)."""
    if not backends:
        raise ValueError("Maglev needs at least one backend")
    permutations = []
    for name in backends:
        data = name.encode()
        offset = _hash(data, 1) % size
        skip = _hash(data, 2) % (size - 1) + 1
        permutations.append((offset, skip))
    table = [-1] * size
    next_index = [0] * len(backends)
    filled = 0
    while True:
        for backend, (offset, skip) in enumerate(permutations):
            slot = (offset + next_index[backend] * skip) % size
            while table[slot] >= 0:
                next_index[backend] += 1
                slot = (offset + next_index[backend] * skip) % size
            table[slot] = backend
            next_index[backend] += 1
            filled += 1
            if filled == size:
                return table


def flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int, key: bytes) -> int:
    """An unsigned 64-bit hash of the 4-tuple, the same on every front (they share ``key``) and in
    their BPF program (flow_hash in bpf/synproxy.h). SipHash-1-3: only fronts compute it, so it is no
    wire format, and it runs for every packet the XDP program forwards (docs/cookie.md, the flow key)."""
    if len(saddr) == 4:
        saddr, daddr = V4_MAPPED_PREFIX + saddr, V4_MAPPED_PREFIX + daddr
    return siphash13(_FLOW_MESSAGE.pack(saddr, daddr, sport, dport), key=key).intdigest() & _U64
