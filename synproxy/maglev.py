"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran uses it.

Every front builds the same lookup table from the same backend list, so all pick the same backend
for a flow without talking to each other; removing a backend moves only the flows it had. The flows a
change moves anyway keep their connections through Beamer's daisy chain (Olteanu et al., NSDI 2018):
PreviousOwners remembers, per slot, the backends that owned it before the changes, and every packet
names two of them, so the new owner can pass on what it has no connection for (docs/backend.md).
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


def build_table(backends: list[str], size: int = DEFAULT_TABLE_SIZE, weights: list[int] | None = None) -> list[int]:
    """Lookup table of backend indexes; ``backends`` are stable names (their addresses). With ``weights``
    a backend takes that many turns per round of the fill (Katran's weighted Maglev), so it owns slots in
    proportion; all weights 1 is the unweighted table."""
    if not backends:
        raise ValueError("Maglev needs at least one backend")
    turns = weights or [1] * len(backends)
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
            for _ in range(turns[backend]):
                slot = (offset + next_index[backend] * skip) % size
                while table[slot] >= 0:
                    next_index[backend] += 1
                    slot = (offset + next_index[backend] * skip) % size
                table[slot] = backend
                next_index[backend] += 1
                filled += 1
                if filled == size:
                    return table


NO_OWNER = bytes(4)  # an encapsulation's former-owner field when there is none to chain to
NO_FORMER_OWNERS = NO_OWNER + NO_OWNER


class PreviousOwners:
    """Per Maglev slot, the two backends a packet of that slot is chained to, in turn, when its current
    owner holds no connection for it: of the owners the slot had within ``window`` seconds before it
    moved, the most recent (Beamer's previous owner) and the oldest (the connections that lasted
    longest); where fewer than two are known, the draining backend that would own the slot without its
    drain (a draining backend keeps its connections as long as it is listed).

    ``owners[slot]`` is the 8 bytes the encapsulation carries: previous, then earlier (IPv4 addresses,
    zero for none). A slot moved three times within the window forgets its middle owner. The history
    lives in the front process: a front (re)started during a window chains nothing it has not seen
    change. Times are the caller's monotonic clock."""

    def __init__(self, window: float, size: int = DEFAULT_TABLE_SIZE):
        self.window = window
        self.owners = [NO_FORMER_OWNERS] * size
        self._current: list[bytes] | None = None
        self._draining = [NO_OWNER] * size
        self._history: dict[int, list[tuple[bytes, float]]] = {}  # slot -> (former owner, until), oldest first
        self._next_expiry = float("inf")

    def follow(self, current: list[bytes], draining: list[bytes], gone: frozenset[bytes], now: float) -> None:
        """A (re)loaded configuration: ``current`` owner per slot, the ``draining`` backend per slot (or
        the current owner), ``gone`` backends never to chain to (down)."""
        if self._current is not None:
            history, before = self._history, self._current
            for slot, owner in enumerate(current):
                if owner != before[slot]:
                    history.setdefault(slot, []).append((before[slot], now + self.window))
        if gone:
            for slot, entries in list(self._history.items()):
                self._history[slot] = [entry for entry in entries if entry[0] not in gone]
        self._current, self._draining = list(current), list(draining)
        self._settle(range(len(current)), now)

    def expire(self, now: float) -> bool:
        """Drop the windows that ended since the last call and recompute their slots; True if any owner
        changed."""
        if now < self._next_expiry or self._current is None:
            return False
        return self._settle(list(self._history), now)

    def _settle(self, slots, now: float) -> bool:
        owners, current, draining, history = self.owners, self._current, self._draining, self._history
        changed = False
        for slot in slots:
            owner = current[slot]
            entries = history.get(slot)
            formers = []
            if entries is not None:
                entries = [entry for entry in entries if entry[1] > now]
                if entries:
                    history[slot] = entries
                    formers = [former for former, _ in entries if former != owner]
                else:
                    del history[slot]
            chosen = [formers[-1], formers[0]] if formers else []  # the most recent, then the oldest
            if draining[slot] != owner:
                chosen.append(draining[slot])
            chosen = list(dict.fromkeys(chosen))[:2]
            value = b"".join(chosen).ljust(8, b"\0")
            if owners[slot] != value:
                owners[slot] = value
                changed = True
        self._next_expiry = min((entries[0][1] for entries in history.values()), default=float("inf"))
        return changed


def flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int, key: bytes) -> int:
    """An unsigned 64-bit hash of the 4-tuple, the same on every front (they share ``key``) and in
    their BPF program (flow_hash in bpf/synproxy.h). SipHash-1-3: only fronts compute it, so it is no
    wire format, and it runs for every packet the XDP program forwards (docs/cookie.md, the flow key)."""
    if len(saddr) == 4:
        saddr, daddr = V4_MAPPED_PREFIX + saddr, V4_MAPPED_PREFIX + daddr
    return siphash13(_FLOW_MESSAGE.pack(saddr, daddr, sport, dport), key=key).intdigest() & _U64
