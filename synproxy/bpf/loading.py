"""The BPF layer both roles share: building objects, the map layouts their loaders pack, salt slots,
flag maps, per-CPU counters and the clock the programs read. Each role's loader keeps only what is its own
(synproxy/backend/loader.py, synproxy/front/fastpath.py); the binding to libbpf is synproxy/bpf/libbpf.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from synproxy.bpf.libbpf import BpfObject, Map
from synproxy.salt import EPOCH_SLOTS, MAX_SECRETS, SaltSchedule

REPO_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
INSTALLED_BPF_DIR = Path(sysconfig.get_path("data")) / "share" / "synproxy" / "bpf"
SALT_SLOT = struct.Struct("<IIQ16s16s")   # struct salt_slot
PORT_KEY = struct.Struct("=H")  # protected_ports key: host order
MAP_KEY = struct.Struct("<I")   # array map index
COUNTER = struct.Struct("<Q")   # one CPU's value in a per-CPU counter map
NS_PER_SECOND = 1_000_000_000


class SetupError(RuntimeError):
    """A BPF program cannot be built, loaded or fed as configured; phrased for the operator."""


def bpf_dir() -> Path:
    """$SYNPROXY_BPF_DIR, else the checkout's bpf/, else the copy `pip install` puts in its data directory
    (pyproject.toml's data-files: /usr/local/share/synproxy/bpf, or the venv's share/synproxy/bpf)."""
    if "SYNPROXY_BPF_DIR" in os.environ:
        return Path(os.environ["SYNPROXY_BPF_DIR"])
    return REPO_BPF_DIR if REPO_BPF_DIR.is_dir() else INSTALLED_BPF_DIR


def find_clang() -> str:
    for name in ("clang-19", "clang"):
        if path := shutil.which(name):
            return path
    raise SetupError("clang not found: install clang-19 (it builds the BPF program)")


def clang_flags() -> list[str]:
    return ["-O2", "-g", "-Wall", "-target", "bpf", "-D__TARGET_ARCH_x86",
            f"-I/usr/include/{os.uname().machine}-linux-gnu"]


def build_object(program: str) -> Path:
    """Compile bpf/<program>.bpf.c unless an object of the same sources and flags exists; return its path.

    Objects live in <bpf dir>/build (or $SYNPROXY_BUILD_DIR) under a hash of the sources and flags, so a
    host without a compiler (the lab's image) runs an object built elsewhere; clang is needed only to build.
    The sources are the program and every header of the bpf dir: knowing which of them it includes would
    take the compiler, and a header shared by two programs (bpf/backend_maps.h) must rebuild both.
    """
    source_dir = bpf_dir()
    flags = clang_flags()
    digest = hashlib.sha256(" ".join(flags).encode())
    source = f"{program}.bpf.c"
    for path in (source_dir / source, *sorted(source_dir.glob("*.h"))):
        try:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError as error:
            raise SetupError(f"BPF source {path}: {error.strerror}") from None
    build_dir = Path(os.environ.get("SYNPROXY_BUILD_DIR", source_dir / "build"))
    target = build_dir / f"{program}-{digest.hexdigest()[:16]}.bpf.o"
    if target.exists():
        return target
    clang = find_clang()
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".o", delete=False) as partial:
        pass
    done = subprocess.run([clang, *flags, f"-I{source_dir}", "-c", str(source_dir / source), "-o",
                           partial.name],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        os.unlink(partial.name)
        raise SetupError(f"building the BPF program failed:\n{done.stderr.strip()}")
    os.replace(partial.name, target)  # atomic: backends starting together may both build
    return target


def mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte form the program keys on: IPv4 as ::ffff:a.b.c.d."""
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}").packed
    return address.packed


def clock_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_TAI, to the millisecond: the programs have only the TAI clock, the salt
    epochs follow the wall clock. Whole seconds in practice; reading the two clocks apart adds µs."""
    return round((time.time_ns() - time.clock_gettime_ns(time.CLOCK_TAI)) / 1e6) * 1_000_000


def salt_slots(schedule: SaltSchedule, epochs: Iterable[int]) -> dict[int, bytes]:
    """A `salts` map's slots (epoch mod 4) for these epochs: their salts (at most two secrets, the
    minting one first). At most four consecutive epochs, so no two share a slot; other slots are absent."""
    slots = {}
    for epoch in epochs:
        keys = schedule.validating_salts(epoch)[:MAX_SECRETS]
        nkeys = len(keys)
        keys += [bytes(16)] * (MAX_SECRETS - nkeys)
        slots[epoch % EPOCH_SLOTS] = SALT_SLOT.pack(1, nkeys, epoch, *keys)
    return slots


def sized_map(bpf_object: BpfObject, name: str, value_size: int) -> Map:
    """A map of a loaded object, refused when its values are not the size the loader packs."""
    found = bpf_object.map(name)
    if found.value_size != value_size:
        raise SetupError(f"map {name!r} holds {found.value_size}-byte values, the loader packs "
                           f"{value_size}: bpf/synproxy.h and the loader disagree")
    return found


class SaltMap:
    """A program's `salts` hash map, rewritten slot by slot only where a slot changed. An update
    replaces the element, so readers see the old value or the new, never a mix; a slot no epoch uses
    is deleted."""

    def __init__(self, salt_map: Map):
        self.map = salt_map
        self._written: dict[int, bytes | None] = {}

    def refresh(self, schedule: SaltSchedule, epochs: Iterable[int]) -> bool:
        """True when a slot changed."""
        wanted = salt_slots(schedule, epochs)
        changed = False
        for slot in range(EPOCH_SLOTS):
            value = wanted.get(slot)
            if slot in self._written and self._written[slot] == value:
                continue
            if value is None:
                self.map.delete(MAP_KEY.pack(slot))
            else:
                self.map.update(MAP_KEY.pack(slot), value)
            self._written[slot] = value
            changed = True
        return changed


def replace_keys(flag_map: Map, wanted: set[bytes]) -> None:
    """Make a map of flags (key -> 1) hold exactly the keys ``wanted``."""
    replace_entries(flag_map, dict.fromkeys(wanted, b"\x01"))


def replace_entries(bpf_map: Map, wanted: dict[bytes, bytes]) -> None:
    """Make a hash map hold exactly the entries ``wanted`` (key -> value)."""
    for key in set(bpf_map.keys()) - wanted.keys():
        bpf_map.delete(key)
    for key, value in wanted.items():
        bpf_map.update(key, value)


def per_cpu_token_bucket(per_second: int, cpus: int) -> tuple[int, int]:
    """A program's per-CPU token bucket (cost_ns, credit_max_ns: token_take in bpf/synproxy.h) for a
    node-wide rate, with a burst of one second's worth: each CPU gets its share of both, and holds at
    least one token. A rate of 0 allows nothing."""
    if not per_second:
        return 0, 0
    cost_ns = NS_PER_SECOND * cpus // per_second
    return cost_ns, max(NS_PER_SECOND, cost_ns)


def counter_total(counter_map: Map, index: int) -> int:
    """One slot of a per-CPU counter map, summed over the CPUs."""
    return sum(COUNTER.unpack(value)[0] for value in counter_map.lookup(MAP_KEY.pack(index)))


def interface_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise SetupError(f"no network interface {name!r} here") from None
