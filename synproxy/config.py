"""YAML configuration shared by fronts and backends: a schema, defaults, and errors that name the line.

Every error is a :class:`ConfigError` whose message is ``FILE:LINE: KEY: what is wrong``. The master
secret lives in its own file, readable by its owner only; its bytes never appear in any message.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from synproxy.salt import MIN_SECRET_BYTES, SaltSchedule

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(ValueError):
    """A configuration problem, already phrased for the operator."""


@dataclass(frozen=True)
class FrontConfig:
    queue_num: int
    farm_address: IPAddress | None
    metrics_address: str | None
    fast_path_interfaces: tuple[str, ...]  # tc ingress answers SYNs here (bpf/front.bpf.c)


@dataclass(frozen=True)
class BackendConfig:
    interface: str | None
    metrics_address: str | None


@dataclass(frozen=True)
class Config:
    source: Path
    vips: tuple[IPAddress, ...]
    ports: tuple[int, ...]
    secret_file: Path
    retired_secret_files: tuple[Path, ...]
    salt_period_seconds: float
    clock_skew_seconds: float
    server_wscale: int
    backend_mss: int
    encap_port: int
    fronts: tuple[IPAddress, ...]
    backends: tuple[IPAddress, ...]
    front: FrontConfig
    backend: BackendConfig
    farm_mtu: int = 1500  # the fronts-to-backends network's MTU: what an encapsulated packet may reach

    def salt_schedule(self) -> SaltSchedule:
        """Read the secrets now (so a reload picks up a rotated secret) and build the schedule."""
        secrets = tuple(read_secret(path) for path in (self.secret_file, *self.retired_secret_files))
        return SaltSchedule(secrets, period=self.salt_period_seconds, skew=self.clock_skew_seconds)


def read_secret(path: Path) -> bytes:
    """The master secret: hex text of at least 16 bytes, in a file no one but its owner can read."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: secret file is accessible to group or others "
                              f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        text = path.read_text().strip()
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
# TypeError / ValueError with a message for the operator.

def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value
    return check


def _seconds(minimum: float, strict: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number of seconds, got {type(value).__name__}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"must be {'above' if strict else 'at least'} {minimum}, got {value}")
        return float(value)
    return check


def _address(value: Any) -> IPAddress:
    if not isinstance(value, str):
        raise TypeError(f"expected an IP address, got {type(value).__name__}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _path(value: Any) -> Path:
    return Path(_text(value))


def _host_port(value: Any) -> str:
    host, sep, port = _text(value).rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    _integer(1, 65535)(int(port) if port.isdigit() else -1)
    return value


@dataclass(frozen=True)
class _Field:
    check: Callable[[Any], Any] | dict
    default: Any = None
    required: bool = False
    many: bool = False


PORT = _integer(1, 65535)

FRONT_SCHEMA = {
    "queue_num": _Field(_integer(0, 65535), 0),
    "farm_address": _Field(_address),
    "metrics_address": _Field(_host_port),
    "fast_path_interfaces": _Field(_text, (), many=True),
}
BACKEND_SCHEMA = {
    "interface": _Field(_text),
    "metrics_address": _Field(_host_port),
}
SCHEMA = {
    "vips": _Field(_address, required=True, many=True),
    "ports": _Field(PORT, required=True, many=True),
    "secret_file": _Field(_path, required=True),
    "retired_secret_files": _Field(_path, (), many=True),
    "salt_period_seconds": _Field(_seconds(0, strict=True), 60.0),
    "clock_skew_seconds": _Field(_seconds(0, strict=False), 2.0),
    "server_wscale": _Field(_integer(0, 14), 7),
    "backend_mss": _Field(_integer(536, 9000), 1460),
    "encap_port": _Field(PORT, 6080),
    "farm_mtu": _Field(_integer(576, 65535), 1500),
    "fronts": _Field(_address, (), many=True),
    "backends": _Field(_address, (), many=True),
    "front": _Field(FRONT_SCHEMA, {}),
    "backend": _Field(BACKEND_SCHEMA, {}),
}


class _Reader:
    """Walks the composed YAML node tree so every error can name its line."""

    def __init__(self, source: Path):
        self.source = source
        self.constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, key: str, message: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{self.source}{line}: {key}: {message}")

    def section(self, node: yaml.Node, schema: dict, prefix: str) -> dict:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, prefix or "(top level)", "expected a mapping of keys to values")
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = f"{prefix}{key}"
            if key not in schema:
                raise self.error(key_node, name, f"unknown key (known: {', '.join(sorted(schema))})")
            if key in values:
                raise self.error(key_node, name, "given twice")
            values[key] = self.value(value_node, schema[key], name)
        for key, field in schema.items():
            if key in values:
                continue
            if field.required:
                raise self.error(node, f"{prefix}{key}", "required key is missing")
            values[key] = (self.section(yaml.MappingNode("tag:yaml.org,2002:map", []), field.check,
                                        f"{prefix}{key}.") if isinstance(field.check, dict)
                           else field.default)
        return values

    def value(self, node: yaml.Node, field: _Field, name: str) -> Any:
        if isinstance(field.check, dict):
            return self.section(node, field.check, f"{name}.")
        if field.many:
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(node, name, "expected a list")
            if field.required and not node.value:
                raise self.error(node, name, "must not be empty")
            return tuple(self.scalar(item, field.check, name) for item in node.value)
        return self.scalar(node, field.check, name)

    def scalar(self, node: yaml.Node, check: Callable[[Any], Any], name: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, name, "expected a single value")
        try:
            return check(self.constructor.construct_object(node))
        except (ValueError, TypeError, yaml.YAMLError) as error:
            raise self.error(node, name, str(error)) from None


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
    secret_file = values["secret_file"]
    base = source.parent
    return Config(
        source=source, vips=values["vips"], ports=values["ports"],
        secret_file=secret_file if secret_file.is_absolute() else base / secret_file,
        retired_secret_files=tuple(p if p.is_absolute() else base / p
                                   for p in values["retired_secret_files"]),
        salt_period_seconds=values["salt_period_seconds"],
        clock_skew_seconds=values["clock_skew_seconds"], server_wscale=values["server_wscale"],
        backend_mss=values["backend_mss"], encap_port=values["encap_port"], farm_mtu=values["farm_mtu"],
        fronts=values["fronts"], backends=values["backends"],
        front=FrontConfig(**values["front"]), backend=BackendConfig(**values["backend"]))


def _key_node(root: yaml.MappingNode, key: str) -> yaml.Node:
    return next((value for k, value in root.value if k.value == key), root)


def _check_relations(values: dict, root: yaml.MappingNode, reader: _Reader) -> None:
    """Constraints between keys, reported at the later key's line."""
    for key in ("vips", "ports", "fronts", "backends"):
        if len(set(values[key])) != len(values[key]):
            raise reader.error(_key_node(root, key), key, "lists the same entry twice")
    if values["clock_skew_seconds"] > values["salt_period_seconds"]:
        raise reader.error(_key_node(root, "clock_skew_seconds"), "clock_skew_seconds",
                           "must not exceed salt_period_seconds")
    overlap = set(values["vips"]) & (set(values["fronts"]) | set(values["backends"]))
    if overlap:
        raise reader.error(_key_node(root, "vips"), "vips",
                           f"{', '.join(map(str, sorted(overlap)))} is also a front or backend address")


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a config file; the secret file is checked too, so errors come at start-up."""
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
    except ValueError as error:  # ConfigError included: it is already phrased with its file.
        raise ConfigError(str(error)) from None
    return config
