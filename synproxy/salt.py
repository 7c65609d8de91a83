"""The rolling salt: every node derives the same per-epoch MAC key from a shared master secret.

No messages pass between nodes: the key for epoch ``e`` is HKDF-SHA256 over the master secret with
``info = b"synproxy-cookie-salt-v1" || e (8 bytes, big endian)``. See docs/cookie.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT_INFO_PREFIX = b"synproxy-cookie-salt-v1"
SALT_BYTES = 16
EPOCH_BITS = 2
EPOCH_SLOTS = 1 << EPOCH_BITS
MIN_SECRET_BYTES = 16
# Secrets the backend's program checks per epoch (struct salt_slot in bpf/synproxy.h): the minting one
# and one accepted secret, which is what a two-phase rotation needs (docs/cookie.md).
MAX_SECRETS = 2
_MISSING = object()


def derive_key(secret: bytes, info: bytes) -> bytes:
    """A 16-byte SipHash key from the master secret: HKDF-SHA256, one ``info`` string per use, so no
    two uses share a key and none reveals the secret."""
    return HKDF(algorithm=hashes.SHA256(), length=SALT_BYTES, salt=None, info=info).derive(secret)


@functools.lru_cache(maxsize=64)
def derive_salt(secret: bytes, epoch: int) -> bytes:
    """The 16-byte SipHash key for ``epoch`` (cached: called once per packet otherwise)."""
    return derive_key(secret, SALT_INFO_PREFIX + epoch.to_bytes(8, "big"))


def epoch_at(now: float, period: float) -> int:
    """Epoch number of unix time ``now``."""
    return math.floor(now / period)


@dataclass(frozen=True)
class SaltSchedule:
    """Which epochs and secrets a node accepts at a given time.

    ``secrets[0]`` makes new cookies; every secret validates (the others are accepted secrets: the next
    one, before every node mints with it, or the previous one, for a grace period after). A cookie is accepted while its epoch overlaps
    ``[now - period - skew, now + skew]``: the current and previous epoch, widened by the tolerated
    clock skew between nodes.
    """

    secrets: tuple[bytes, ...]
    period: float = 60.0
    skew: float = 2.0

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("at least one master secret is required")
        if any(len(s) < MIN_SECRET_BYTES for s in self.secrets):
            raise ValueError(f"a master secret must be at least {MIN_SECRET_BYTES} bytes")
        if self.period <= 0:
            raise ValueError("salt period must be positive")
        if not 0 <= self.skew <= self.period:
            raise ValueError("clock skew tolerance must be between 0 and the salt period")
        object.__setattr__(self, "_window_cache", {})
        object.__setattr__(self, "_minting", (0.0, 0.0, None))

    def current_epoch(self, now: float) -> int:
        return epoch_at(now, self.period)

    def accepted_epochs(self, now: float) -> range:
        """Epochs whose cookies validate at ``now`` (at most four, so two bits tell them apart)."""
        return range(max(0, epoch_at(now - self.period - self.skew, self.period)),
                     epoch_at(now + self.skew, self.period) + 1)

    def epoch_for_bits(self, epoch_bits: int, now: float) -> int | None:
        """The one accepted epoch whose low bits are ``epoch_bits``, or None."""
        for epoch in self.accepted_epochs(now):
            if epoch % EPOCH_SLOTS == epoch_bits:
                return epoch
        return None

    def salts_for_bits(self, epoch_bits: int, now: float) -> tuple[int, tuple[bytes, ...]] | None:
        """The accepted epoch named by ``epoch_bits`` and every secret's salt for it, or None.

        Cached per acceptance window: this runs for every ACK a front sees.
        """
        window = (epoch_at(now - self.period - self.skew, self.period), epoch_at(now + self.skew, self.period),
                  epoch_bits)
        cache = self._window_cache
        found = cache.get(window, _MISSING)
        if found is _MISSING:
            if len(cache) > 64:
                cache.clear()
            epoch = self.epoch_for_bits(epoch_bits, now)
            found = cache[window] = None if epoch is None else (epoch, tuple(self.validating_salts(epoch)))
        return found

    def minting_salt(self, now: float) -> tuple[int, bytes]:
        """The current epoch and the salt new cookies use (cached for the epoch: every SYN asks)."""
        start, end, minting = self._minting
        if start <= now < end:
            return minting
        epoch = self.current_epoch(now)
        minting = (epoch, derive_salt(self.secrets[0], epoch))
        object.__setattr__(self, "_minting", (epoch * self.period, (epoch + 1) * self.period, minting))
        return minting

    def validating_salts(self, epoch: int) -> list[bytes]:
        return [derive_salt(secret, epoch) for secret in self.secrets]


class SecretRotation:
    """Keeps a replaced secret accepted for a grace period, so handshakes in flight survive a rotation.

    When a reload drops a secret, cookies minted with it may still be in flight: it stays accepted
    (after the configured ones) for ``2 × period + skew``, the longest a cookie lives.
    """

    def __init__(self) -> None:
        self._retired: dict[bytes, float] = {}

    def effective(self, configured: SaltSchedule, previous: SaltSchedule | None, now: float) -> SaltSchedule:
        grace = 2 * configured.period + configured.skew
        for secret in previous.secrets if previous else ():
            if secret not in configured.secrets:
                self._retired.setdefault(secret, now + grace)
        self._retired = {secret: until for secret, until in self._retired.items()
                         if until > now and secret not in configured.secrets}
        if not self._retired:
            return configured
        return replace(configured, secrets=configured.secrets + tuple(self._retired))
