"""YAML configuration shared by fronts and backends: a schema, defaults, and errors that name the line.

Every error is a :class:`ConfigError` whose message is ``FILE:LINE: KEY: what is wrong``, naming the
bad value; warnings (a deprecated key, a risky combination) have the same form and are kept in
``Config.warnings``. A key given no value (``front:`` with nothing under it) means its default. The
master secret lives in its own file, readable by its owner only; its bytes never appear in any message.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synproxy.logs import log
from synproxy.maglev import derive_flow_key
from synproxy.salt import MAX_SECRETS, MIN_SECRET_BYTES, SaltSchedule
from synproxy.tfo import DEFAULT_KEY_PERIOD_SECONDS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Fronts refresh their fast path's salts every 0.5 s and backends their program's every 0.25 s, each
# writing the epochs it accepts or mints next: a period several times longer keeps every new epoch's
# salt in the maps well before its first cookie. A cookie also lives at least one period (docs/cookie.md),
# which must exceed a client's round trip, and clock_skew_seconds (default 2) may not exceed it.
MIN_SALT_PERIOD_SECONDS = 2.0
# Resets a backend sends per second, at most, to packets no connection owns (forged ACKs, or packets of a
# connection it lost): an ACK flood the fronts cannot tell from established traffic then costs the
# backend a socket lookup, not a RST each (docs/backend.md). The bound: one per µs, beyond what a core sends.
UNKNOWN_FLOW_RESETS_PER_SECOND = 1000
MAX_UNKNOWN_FLOW_RESETS_PER_SECOND = 1_000_000
# front.data_plane: where the front handles packets (docs/front.md); front.xdp_mode: how XDP attaches.
DATA_PLANES = ("auto", "xdp", "tc", "nfqueue")
# front.syn_reply: how the kernel data plane sends a SYN-ACK: by the route lookup, or back to the
# neighbour and interface the SYN came from (docs/front.md, "The SYN-ACK's way back").
SYN_REPLIES = ("route", "ingress")
# How long a front chains a moved flow's packets to the backend that owned it before a change (Beamer's
# previous table, docs/backend.md): longer than the connections that must survive a change. An hour
# covers ordinary ones; the cost of a long window is a second hop for a moved flow's packets that its
# new owner holds no connection for (old connections, forged ACKs).
PREVIOUS_TABLE_SECONDS = 3600.0
MAX_BACKEND_WEIGHT = 1000  # Maglev turns per round: proportions finer than 1:1000 mean nothing at 65537 slots
XDP_MODES = ("auto", "native", "generic")
# A TFO cookie lives one to two key periods and a client keeps it across visits (docs/cookie.md): a period
# shorter than a minute would make clients re-learn cookies all the time for no gain.
MIN_TFO_KEY_PERIOD_SECONDS = 60.0
# front.workers: one NFQUEUE and one process per worker (docs/front.md); queues are numbered from queue_num.
MAX_WORKERS = 1024
# front.queue_packets_per_second's default, per worker: about a third of what one worker's handler
# answered in the bench (synproxy-front-nfqueue, 28k SYNs/s, 2026-11-30 17:53 UTC), so a flood of what
# the programs leave to the queue costs each worker at most about a third of a CPU (docs/front.md).
QUEUE_PACKETS_PER_WORKER = 10_000
MAX_QUEUE_PACKETS_PER_SECOND = 10**8
MAX_QUEUE = 65535
SECRET_COMMAND = "(umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > {path})"


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


@dataclass(frozen=True)
class BgpConfig:
    local_as: int | None            # None: the front announces nothing (no BGP)
    peer_as: int | None
    peers: tuple[IPAddress, ...]    # () = the gateways of the IPv4 default route
    hold_time_seconds: int
    stop_wait_seconds: float        # after withdrawing on a clean stop, keep answering this long


@dataclass(frozen=True)
class FrontConfig:
    queue_num: int
    farm_address: IPAddress | None
    metrics_address: str | None
    data_plane: str                 # auto, xdp, tc or nfqueue (docs/front.md)
    interfaces: tuple[str, ...]     # where the kernel data plane attaches; () = the default routes' interfaces
    xdp_mode: str                   # auto, native or generic
    syn_reply: str                  # route (the route lookup) or ingress (back to the SYN's sender)
    previous_table_seconds: float   # how long a moved flow is chained to its previous backend
    workers: int = 1                # queue-reading processes, on queues queue_num .. queue_num + workers - 1
    bgp: BgpConfig | None = None
    queue_packets_per_second: int = QUEUE_PACKETS_PER_WORKER  # what the BPF programs leave to the queue, at most


@dataclass(frozen=True)
class BackendEntry:
    """One of `backends`: an address, or a mapping with these keys."""
    address: IPAddress
    weight: int = 1       # Maglev share relative to the others
    drain: bool = False   # no new connections; its own keep being chained to it while it is listed
    down: bool = False    # gone: no new connections, nothing chained to it (its connections reset)


@dataclass(frozen=True)
class BackendConfig:
    interface: str | None
    metrics_address: str | None
    unknown_flow_resets_per_second: int  # the program's reset budget; 0: drop them all


@dataclass(frozen=True)
class TfoConfig:
    enabled: bool               # backends install the farm's TCP Fast Open keys (docs/backend.md)
    key_period_seconds: float   # a new key each period; the previous one is still accepted


@dataclass(frozen=True)
class Config:
    source: Path
    vips: tuple[IPAddress, ...]
    ports: tuple[int, ...]
    secret_file: Path
    accepted_secret_files: tuple[Path, ...]  # validate, never mint: the two-phase rotation's other secret
    flow_secret_file: Path | None             # the flow hash's key comes from it (secret_file when None)
    salt_period_seconds: float
    clock_skew_seconds: float
    server_wscale: int
    backend_mss: int
    encap_port: int
    fronts: tuple[IPAddress, ...]
    backends: tuple[IPAddress, ...]         # every listed backend's address, draining and down ones too
    front: FrontConfig
    backend: BackendConfig
    farm_mtu: int = 1500  # the fronts-to-backends network's MTU: what an encapsulated packet may reach
    # Whether the fronts answer a client's SACK-permitted / ECN / timestamps / window scale: only when every
    # backend's stack accepts it (net.ipv4.tcp_sack, tcp_ecn, tcp_timestamps, tcp_window_scaling), or the
    # two ends disagree (docs/front.md, "Real clients").
    sack: bool = True
    ecn: bool = True
    timestamps: bool = True
    window_scaling: bool = True
    backend_entries: tuple[BackendEntry, ...] = ()  # `backends` with their weight, drain and down settings
    tfo: TfoConfig = TfoConfig(enabled=False, key_period_seconds=DEFAULT_KEY_PERIOD_SECONDS)
    warnings: tuple[str, ...] = ()
    lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def salt_schedule(self) -> SaltSchedule:
        """Read the secrets now (so a reload picks up a rotated secret) and build the schedule."""
        secrets = (self.secret("secret_file", self.secret_file),
                   *(self.secret("accepted_secret_files", path) for path in self.accepted_secret_files))
        return SaltSchedule(secrets, period=self.salt_period_seconds, skew=self.clock_skew_seconds)

    def flow_key(self) -> bytes:
        """The key every front hashes flows with (maglev.flow_hash), read now like the secrets."""
        if self.flow_secret_file is None:
            return derive_flow_key(self.secret("secret_file", self.secret_file))
        return derive_flow_key(self.secret("flow_secret_file", self.flow_secret_file))

    def secret(self, key: str, path: Path) -> bytes:
        """:func:`read_secret`, its errors prefixed with the key (and line) that names the file: one file
        may serve several keys, and a relative path is resolved against the configuration's folder."""
        try:
            return read_secret(path)
        except ConfigError as error:
            raise ConfigError(f"{self.where(key)}: {error}") from None

    def where(self, key: str) -> str:
        """``FILE:LINE: key`` for a message about ``key`` (its section's line when it was not given)."""
        line = self.lines.get(key) or self.lines.get(key.rpartition(".")[0])
        return f"{self.source}{f':{line}' if line else ''}: {key}"

    def farm_address_among(self, local: set[IPAddress]) -> IPAddress:
        """A front's farm address: ``front.farm_address``, or the one of ``fronts`` among ``local``."""
        if self.front.farm_address is not None:
            return self.front.farm_address
        found = local & set(self.fronts)
        if len(found) != 1:
            raise ConfigError(f"{self.where('front.farm_address')}: not set, and "
                              f"{'none' if not found else 'more than one'} of `fronts` is local to this node")
        return found.pop()


def write_secret(path: Path, secret: bytes) -> None:
    """Write ``secret`` as :func:`read_secret` reads it: hex, owner-only from the file's creation on (a
    touch-then-write leaves the mode to the umask, and an existing file's mode as it was)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(descriptor, 0o600)
        file.write(secret.hex() + "\n")


def read_secret(path: Path) -> bytes:
    """The master secret: hex text of at least 16 bytes, in a file no one but its owner can read."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a directory's mode would be blamed below; a FIFO would block the start
            raise ConfigError(f"{path}: cannot read secret file: "
                              f"{'Is a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: secret file is accessible to group or others "
                              f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: secret file does not exist; make it once, then copy it to every node: "
                          + SECRET_COMMAND.format(path=shlex.quote(str(path)))) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read secret file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: secret file must hold hex text") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: secret file must hold hex text") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"{path}: secret must be at least {MIN_SECRET_BYTES} bytes "
                          f"({2 * MIN_SECRET_BYTES} hex digits)")
    return secret


# Value checkers: each takes the constructed YAML value and returns the typed one, or raises
# TypeError / ValueError with a message for the operator that names the value.

def _shown(value: Any) -> str:
    """A value as the operator wrote it: 'eighty', 80, true, nothing."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {_shown(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value
    return check


def _seconds(minimum: float, strict: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number of seconds, got {_shown(value)}")
        if not math.isfinite(value):  # YAML's .inf and .nan: epochs, waits and periods need a real number
            raise ValueError(f"expected a finite number of seconds, got {_shown(value)}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"must be {'above' if strict else 'at least'} {minimum}, got {value}")
        return float(value)
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_shown(value)}")
    return value


def _address(value: Any) -> IPAddress:
    """A unicast address a packet can be sent to and from: not 0.0.0.0, ::, multicast, loopback,
    link-local or reserved (which includes 255.255.255.255 and IPv4-mapped IPv6)."""
    if not isinstance(value, str):
        raise TypeError(f"expected an IP address, got {_shown(value)}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"not an IP address: {_shown(value)}") from None
    for kind, described in _UNUSABLE.items():
        if getattr(address, f"is_{kind}"):
            raise ValueError(f"{value} is {described}, not a unicast address of a host")
    return address


_UNUSABLE = {"unspecified": "the unspecified address", "multicast": "a multicast address",
             "loopback": "a loopback address", "link_local": "a link-local address",
             "reserved": "a reserved address"}


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_shown(value)}")
        return value
    return check


def _workers(value: Any) -> int:
    """A count of at least 1, or ``auto``: the number of online CPUs (``--queue-cpu-fanout`` numbers the
    queues by the CPU that received the packet, so more workers than CPUs would get nothing)."""
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or auto, got {_shown(value)}")
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}, or auto, got {value}")
    return value


def _queue_packets_per_second(value: Any) -> int | None:
    """A rate of at least 1, or ``auto`` (None here: QUEUE_PACKETS_PER_WORKER per worker, once the workers
    are known)."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or auto, got {_shown(value)}")
    if not 1 <= value <= MAX_QUEUE_PACKETS_PER_SECOND:
        raise ValueError(f"must be between 1 and {MAX_QUEUE_PACKETS_PER_SECOND}, or auto, got {value}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {_shown(value)}")
    return value


def _path(value: Any) -> Path:
    return Path(_text(value))


def _host_port(value: Any) -> str:
    """``IPV4:PORT`` or ``[IPV6]:PORT``. A host name is refused: resolving it would happen at start-up,
    where an unresolvable one hung for 10 s before failing."""
    host, sep, port = _text(value).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected IP:PORT or [IPV6]:PORT, got {_shown(value)}")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"the host must be an IP address (names are not resolved), got {host!r}") from None
    if (address.version == 6) != bracketed:
        raise ValueError(f"an IPv6 host goes in brackets ([::]:9100), an IPv4 one not, got {_shown(value)}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"the port must be between 1 and 65535, got {port}")
    return value


@dataclass(frozen=True)
class _Field:
    check: Callable[[Any], Any] | dict
    default: Any = None
    required: bool = False
    many: bool = False
    entry: dict | None = None  # many: an item may also be a mapping of this schema (its first key given as a scalar)


PORT = _integer(1, 65535)

FRONT_SCHEMA = {
    "queue_num": _Field(_integer(0, MAX_QUEUE), 0),
    "farm_address": _Field(_address),
    "metrics_address": _Field(_host_port),
    "data_plane": _Field(_choice(*DATA_PLANES), "auto"),
    "interfaces": _Field(_text, (), many=True),
    "xdp_mode": _Field(_choice(*XDP_MODES), "auto"),
    "syn_reply": _Field(_choice(*SYN_REPLIES), "route"),
    "workers": _Field(_workers, 1),
    "queue_packets_per_second": _Field(_queue_packets_per_second),  # None: auto
    "bgp": _Field({
        "local_as": _Field(_integer(1, 4294967294)),
        "peer_as": _Field(_integer(1, 4294967294)),
        "peers": _Field(_address, (), many=True),
        "hold_time_seconds": _Field(_integer(3, 65535), 3),
        "stop_wait_seconds": _Field(_seconds(0, strict=False), 2.0),
    }, {}),
    "previous_table_seconds": _Field(_seconds(0, strict=False), PREVIOUS_TABLE_SECONDS),
}
BACKEND_ENTRY_SCHEMA = {
    "address": _Field(_address, required=True),
    "weight": _Field(_integer(1, MAX_BACKEND_WEIGHT), 1),
    "drain": _Field(_boolean, False),
    "down": _Field(_boolean, False),
}
BACKEND_SCHEMA = {
    "interface": _Field(_text),
    "metrics_address": _Field(_host_port),
    "unknown_flow_resets_per_second": _Field(_integer(0, MAX_UNKNOWN_FLOW_RESETS_PER_SECOND),
                                             UNKNOWN_FLOW_RESETS_PER_SECOND),
}
TFO_SCHEMA = {
    "enabled": _Field(_boolean, False),
    "key_period_seconds": _Field(_seconds(MIN_TFO_KEY_PERIOD_SECONDS, strict=False),
                                 DEFAULT_KEY_PERIOD_SECONDS),
}
SCHEMA = {
    "vips": _Field(_address, required=True, many=True),
    "ports": _Field(PORT, required=True, many=True),
    "secret_file": _Field(_path, required=True),
    "accepted_secret_files": _Field(_path, (), many=True),
    "flow_secret_file": _Field(_path),
    "salt_period_seconds": _Field(_seconds(MIN_SALT_PERIOD_SECONDS, strict=False), 60.0),
    "clock_skew_seconds": _Field(_seconds(0, strict=False), 2.0),
    "server_wscale": _Field(_integer(0, 14), 7),
    "backend_mss": _Field(_integer(536, 9000), 1460),
    "sack": _Field(_boolean, True),
    "ecn": _Field(_boolean, True),
    "timestamps": _Field(_boolean, True),
    "window_scaling": _Field(_boolean, True),
    "encap_port": _Field(PORT, 6080),
    "farm_mtu": _Field(_integer(576, 65535), 1500),
    "fronts": _Field(_address, (), many=True),
    "backends": _Field(_address, required=True, many=True, entry=BACKEND_ENTRY_SCHEMA),
    "front": _Field(FRONT_SCHEMA, {}),
    "backend": _Field(BACKEND_SCHEMA, {}),
    "tfo": _Field(TFO_SCHEMA, {}),
}
# Old name -> new name (with its section), still read.
RENAMED = {"retired_secret_files": "accepted_secret_files", "front.fast_path_interfaces": "front.interfaces"}


class _Reader:
    """Walks the composed YAML node tree so every error can name its line."""

    def __init__(self, source: Path):
        self.source = source
        self.constructor = yaml.SafeLoader("")
        self.warnings: list[str] = []
        self.lines: dict[str, int] = {}

    def error(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        return ConfigError(self.message(node, key, message))

    def message(self, node: yaml.Node | None, key: str, message: str) -> str:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return f"{self.source}{line}: {key}: {message}"

    def section(self, node: yaml.Node, schema: dict, name: str) -> dict:
        prefix = f"{name}." if name else ""
        if _is_empty(node):
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark)
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, name or "(top level)",
                             f"expected a mapping of keys to values, got {_described(node)}")
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else _described(key_node)
            if f"{prefix}{key}" in RENAMED:
                new_name = RENAMED[f"{prefix}{key}"]
                self.warnings.append(self.message(key_node, f"{prefix}{key}", f"deprecated: renamed {new_name} "
                                                  "(same meaning); the old name will go"))
                key = new_name.rpartition(".")[2]
            if key not in schema:
                raise self.error(key_node, f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(schema))})")
            if key in values:
                raise self.error(key_node, f"{prefix}{key}", "given twice")
            self.lines[f"{prefix}{key}"] = key_node.start_mark.line + 1
            values[key] = self.value(value_node, schema[key], f"{prefix}{key}")
        for key, field_ in schema.items():
            if key in values:
                continue
            if field_.required:
                raise self.error(node, f"{prefix}{key}", "required key is missing")
            values[key] = self.default(node, field_, f"{prefix}{key}")
        return values

    def default(self, node: yaml.Node, field_: _Field, name: str) -> Any:
        if isinstance(field_.check, dict):
            return self.section(yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark), field_.check, name)
        return field_.default

    def value(self, node: yaml.Node, field_: _Field, name: str) -> Any:
        if isinstance(field_.check, dict):
            return self.section(node, field_.check, name)
        if _is_empty(node):
            if field_.required:
                raise self.error(node, name, "required, but given no value")
            return field_.default
        if field_.many:
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(node, name, f"expected a list, got {_described(node)}")
            if field_.required and not node.value:
                raise self.error(node, name, "must not be empty")
            return tuple(self.item(item, field_, name) for item in node.value)
        return self.scalar(node, field_.check, name)

    def item(self, node: yaml.Node, field_: _Field, name: str) -> Any:
        """One list item: a scalar, or with ``entry`` a mapping (the scalar form fills its first key)."""
        if field_.entry is None:
            return self.scalar(node, field_.check, name)
        if isinstance(node, yaml.MappingNode):
            return self.section(node, field_.entry, name)
        first = next(iter(field_.entry))
        return {key: self.scalar(node, field_.check, name) if key == first else entry.default
                for key, entry in field_.entry.items()}

    def scalar(self, node: yaml.Node, check: Callable[[Any], Any], name: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, name, f"expected a single value, got {_described(node)}")
        try:
            return check(self.constructor.construct_object(node))
        except (ValueError, TypeError) as error:
            raise self.error(node, name, str(error)) from None
        except yaml.YAMLError as error:  # an unknown tag (!foo): its text spans lines and quotes the file
            raise self.error(node, name, getattr(error, "problem", None) or "not a value") from None


def _is_empty(node: yaml.Node) -> bool:
    """``key:`` with nothing after it (or ``~``, ``null``)."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _described(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_empty(node):
        return "nothing"
    return node.value if node.style is None else repr(node.value)  # as written: 80, 'eighty


def parse_config(text: str, source: Path) -> Config:
    """Parse and validate configuration text; ``source`` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if root is None:
        raise ConfigError(f"{source}: the file is empty")
    reader = _Reader(source)
    values = reader.section(root, SCHEMA, "")
    _check_relations(values, root, reader)
    base = source.parent

    def resolved(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    return Config(
        source=source, vips=values["vips"], ports=values["ports"],
        secret_file=resolved(values["secret_file"]),
        accepted_secret_files=tuple(map(resolved, values["accepted_secret_files"])),
        flow_secret_file=values["flow_secret_file"] and resolved(values["flow_secret_file"]),
        salt_period_seconds=values["salt_period_seconds"],
        clock_skew_seconds=values["clock_skew_seconds"], server_wscale=values["server_wscale"],
        backend_mss=values["backend_mss"], encap_port=values["encap_port"], farm_mtu=values["farm_mtu"],
        sack=values["sack"], ecn=values["ecn"], timestamps=values["timestamps"],
        window_scaling=values["window_scaling"],
        fronts=values["fronts"], backends=tuple(entry["address"] for entry in values["backends"]),
        backend_entries=tuple(BackendEntry(**entry) for entry in values["backends"]),
        front=FrontConfig(**{**values["front"], "bgp": BgpConfig(**values["front"]["bgp"]),
                             "queue_packets_per_second": values["front"]["queue_packets_per_second"]
                             or QUEUE_PACKETS_PER_WORKER * values["front"]["workers"]}),
        backend=BackendConfig(**values["backend"]), tfo=TfoConfig(**values["tfo"]),
        warnings=tuple(reader.warnings), lines=reader.lines)


def _key_node(root: yaml.MappingNode, key: str) -> yaml.Node:
    names = {key} | {old for old, new in RENAMED.items() if new == key}
    return next((value for k, value in root.value if k.value in names), root)


def _check_relations(values: dict, root: yaml.MappingNode, reader: _Reader) -> None:
    """Constraints between keys, reported at the later key's line."""
    backends = [entry["address"] for entry in values["backends"]]
    for key, listed in (("vips", values["vips"]), ("ports", values["ports"]), ("fronts", values["fronts"]),
                        ("backends", backends)):
        if len(set(listed)) != len(listed):
            raise reader.error(_key_node(root, key), key, "lists the same entry twice")
    if any(entry["drain"] and entry["down"] for entry in values["backends"]):
        raise reader.error(_key_node(root, "backends"), "backends", "a backend is either draining or down, not both")
    if all(entry["drain"] or entry["down"] for entry in values["backends"]):
        raise reader.error(_key_node(root, "backends"), "backends",
                           "every backend is draining or down: new connections would have nowhere to go")
    if values["clock_skew_seconds"] > values["salt_period_seconds"]:
        raise reader.error(_key_node(root, "clock_skew_seconds"), "clock_skew_seconds",
                           "must not exceed salt_period_seconds")
    overlap = set(values["vips"]) & (set(values["fronts"]) | set(backends))
    if overlap:
        raise reader.error(_key_node(root, "vips"), "vips",
                           f"{', '.join(map(str, sorted(overlap)))} is also a front or backend address")
    front = values["front"]
    if front["queue_num"] + front["workers"] - 1 > MAX_QUEUE:
        raise reader.error(_key_node(_key_node(root, "front"), "workers"), "front.workers",
                           f"{front['workers']} workers from queue_num {front['queue_num']} would need queues "
                           f"beyond {MAX_QUEUE}")
    bgp = front["bgp"]
    if (bgp["local_as"] is None) != (bgp["peer_as"] is None):
        missing = "front.bgp.peer_as" if bgp["peer_as"] is None else "front.bgp.local_as"
        raise reader.error(_key_node(_key_node(_key_node(root, "front"), "bgp"), missing.rpartition(".")[2]),
                           missing, "front.bgp needs both local_as and peer_as")
    if any(peer.version != 4 for peer in bgp["peers"]):
        raise reader.error(_key_node(_key_node(_key_node(root, "front"), "bgp"), "peers"), "front.bgp.peers",
                           "IPv4 addresses only: one session carries the IPv4 and the IPv6 VIPs")
    accepted = values["accepted_secret_files"]
    if len(accepted) > MAX_SECRETS - 1:
        raise reader.error(_key_node(root, "accepted_secret_files"), "accepted_secret_files",
                           f"at most {MAX_SECRETS - 1}, got {len(accepted)}: the backends check {MAX_SECRETS} "
                           "secrets (secret_file and one accepted); finish a rotation before starting the next")
    if values["secret_file"] in accepted:
        raise reader.error(_key_node(root, "accepted_secret_files"), "accepted_secret_files",
                           f"lists secret_file ({values['secret_file']})")
    if accepted and values["flow_secret_file"] is None:
        reader.warnings.append(reader.message(
            _key_node(root, "accepted_secret_files"), "accepted_secret_files",
            "rotating without flow_secret_file: the flow hash's key comes from secret_file, so when it "
            "changes every established flow moves to another backend; set flow_secret_file to the current "
            "secret_file first (docs/cookie.md)"))


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a config file; the secret files are checked too, so errors come at start-up."""
    source = Path(path)
    try:
        text = source.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file") from None
    config = parse_config(text, source)
    try:
        config.salt_schedule()
        config.flow_key()
    except ValueError as error:  # ConfigError included: it is already phrased with its file.
        raise ConfigError(str(error)) from None
    return config


def log_warnings(config: Config) -> None:
    """A running node's warnings go to its log (check-config prints them)."""
    for warning in config.warnings:
        log("config_warning", warning=warning)


def role_warnings(config: Config, role: str, local: set[IPAddress], blackholed: set[IPAddress],
                  interfaces: set[str]) -> list[str]:
    """What makes this file wrong for this node in ``role``, given the node's addresses, the VIPs its
    routes blackhole and its interfaces' names (facts the caller gathers)."""
    warnings = []
    if role == "front":
        try:
            farm = config.farm_address_among(local)
            if farm not in local:
                warnings.append(f"{config.where('front.farm_address')}: {farm} is not an address of this node")
        except ConfigError as error:
            warnings.append(str(error))
        for vip in config.vips:
            if vip not in blackholed:
                warnings.append(f"{config.where('vips')}: {vip} has no blackhole route on this node: VIP traffic "
                                f"the queue does not rewrite would be routed back out "
                                f"(ip route add blackhole {vip}/{vip.max_prefixlen})")
        missing = [name for name in config.front.interfaces if name not in interfaces]
        if missing and config.front.data_plane != "nfqueue":
            # Named, so meant: with data_plane auto the front would start on the queue alone (27k SYN/s
            # against native XDP's 299k in the README's benchmark).
            outcome = ("the front falls back to the queue" if config.front.data_plane == "auto"
                       else "the front will not start")
            warnings.append(f"{config.where('front.interfaces')}: no interface {', '.join(missing)} on this node: "
                            f"the BPF programs cannot attach there (front.data_plane {config.front.data_plane}: "
                            f"{outcome})")
    elif role == "backend":
        missing = [str(vip) for vip in config.vips if vip not in local]
        if missing:
            warnings.append(f"{config.where('vips')}: {', '.join(missing)} not configured on this node: "
                            "a backend answers from the VIPs (ip address add VIP dev lo)")
        if not config.fronts:
            warnings.append(f"{config.where('fronts')}: empty: this backend trusts no front, so it drops every "
                            "encapsulated packet (untrusted) and no handshake completes")
        if config.backend.interface and config.backend.interface not in interfaces:
            warnings.append(f"{config.where('backend.interface')}: no interface {config.backend.interface} on this "
                            "node: the backend will not start unless --interface names another")
    return warnings
