"""The backend loader's pure parts: map layouts it packs and the salts it keeps (no kernel needed)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from synproxy import cli
from synproxy.backend.loader import COUNTERS, OPTION_KEYS, ensure_sysctls, held_epochs
from synproxy.bpf import libbpf
from synproxy.bpf.loading import (
    SetupError,
    bpf_dir,
    build_object,
    clang_flags,
    find_clang,
    mapped,
    per_cpu_token_bucket,
    salt_slots,
)
from synproxy.config import write_secret
from synproxy.netns import inside, namespaces, unique_name, write_sysctls
from synproxy.salt import SaltSchedule, derive_salt

SALT_SLOT = struct.Struct("<IIQ16s16s")


def test_counter_names_follow_the_enum_in_the_header():
    header = (bpf_dir() / "synproxy.h").read_text()
    enum = re.search(r"enum counter \{(.*?)\};", header, re.DOTALL).group(1)
    names = [name.lower() for name in re.findall(r"COUNTER_(\w+),", enum) if name != "MAX"]
    assert tuple(names) == COUNTERS


@pytest.mark.parametrize("rate, cpus, expected", [
    (0, 2, (0, 0)),                            # no resets at all
    (1000, 2, (2_000_000, 1_000_000_000)),     # 500/s per CPU, a burst of 500 each
    (1_000_000, 1, (1000, 1_000_000_000)),
    (1, 4, (4_000_000_000, 4_000_000_000)),    # below one per CPU: each still holds one
])
def test_the_reset_budget_shares_rate_and_burst_between_cpus(rate, cpus, expected):
    assert per_cpu_token_bucket(rate, cpus) == expected


def test_fronts_are_keyed_as_ipv4_mapped_ipv6():
    assert mapped(ipaddress.ip_address("198.18.10.2")) == bytes(10) + b"\xff\xff" + bytes([198, 18, 10, 2])
    assert mapped(ipaddress.ip_address("2001:db8::1")) == ipaddress.ip_address("2001:db8::1").packed


def test_salt_slots_hold_the_accepted_epochs_and_leave_the_rest_absent():
    primary, retired, third = b"p" * 32, b"r" * 32, b"t" * 32
    schedule = SaltSchedule((primary, retired, third), period=60, skew=2)
    now = 1000 * 60 + 1  # epochs 998 (skew), 999 and 1000 are accepted
    slots = {slot: SALT_SLOT.unpack(value) for slot, value in salt_slots(schedule, schedule.accepted_epochs(now)).items()}
    assert sorted(slots) == sorted(epoch % 4 for epoch in (998, 999, 1000))
    for epoch in (998, 999, 1000):
        # Two key slots: the primary and the first retired secret.
        assert slots[epoch % 4] == (1, 2, epoch, derive_salt(primary, epoch), derive_salt(retired, epoch))


@pytest.mark.parametrize("skew, now, held", [
    (0, 1000 * 60 + 59.9, (999, 1000, 1001)),        # the next epoch is there before its boundary
    (2, 1000 * 60 + 30, (999, 1000, 1001)),
    (2, 1000 * 60 + 1, (998, 999, 1000, 1001)),      # 998 still accepted (skew): 1001 just fits
    (45, 1000 * 60 + 20, (998, 999, 1000, 1001)),    # four accepted: 1002 would take 998's slot
])
def test_held_epochs_are_the_accepted_ones_and_the_next_when_its_slot_is_free(skew, now, held):
    schedule = SaltSchedule((b"p" * 32,), period=60, skew=skew)
    assert tuple(held_epochs(schedule, now)) == held
    assert set(schedule.accepted_epochs(now)) <= set(held)


def test_a_single_secret_fills_one_key():
    schedule = SaltSchedule((b"p" * 32,), period=60, skew=0)
    valid, nkeys, epoch, first, second = SALT_SLOT.unpack(salt_slots(schedule, schedule.accepted_epochs(30))[0])
    assert (valid, nkeys, epoch, first, second) == (1, 1, 0, derive_salt(b"p" * 32, 0), bytes(16))


def _config(directory: Path, interface: str | None) -> Path:
    write_secret(directory / "secret.hex", b"\xab" * 32)
    config = directory / "synproxy.yaml"
    config.write_text("vips: [198.19.0.10]\nports: [80]\nsecret_file: secret.hex\nfronts: [198.18.10.2]\nbackends: [198.18.20.2]\n"
                      + (f"backend:\n  interface: {interface}\n" if interface else ""))
    return config


@pytest.mark.parametrize("interface, euid, message", [
    (None, 0, "synproxy backend: no interface: set backend.interface in the config or pass --interface"),
    ("lo", 1000, "synproxy backend: the backend must run as root (it loads BPF programs and attaches to tc)"),
])
def test_operator_errors_are_one_line_and_exit_1(tmp_path, monkeypatch, capsys, interface, euid, message):
    """The node's: one JSON line, as the rest of its log; --stats's: the plain line SystemExit prints."""
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setattr(libbpf, "log_messages", lambda: None)  # libbpf's printing in this process stays its own
    argv = ["backend", "--config", str(_config(tmp_path, interface))]
    assert cli.main(argv) == 1
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["event"], line["error"]) == ("fatal", "fatal", message)
    with pytest.raises(SystemExit) as stats:
        cli.main([*argv, "--stats"])
    assert (stats.value.code, capsys.readouterr().err) == (message, "")


def test_missing_clang_is_named_when_a_build_is_needed(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNPROXY_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SetupError, match="clang not found: install clang-19"):
        build_object("backend")
    assert list(tmp_path.iterdir()) == []


def test_an_object_built_elsewhere_needs_no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNPROXY_BUILD_DIR", str(tmp_path))
    built = build_object("backend")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert build_object("backend") == built


@pytest.mark.parametrize("program", ["backend", "backend_xdp"])
def test_editing_a_header_the_program_includes_rebuilds_it(monkeypatch, tmp_path, program):
    """The XDP stage runs over the tc program's maps: an object built from a stale bpf/backend_maps.h
    would be refused (or worse, read another layout) when the loader hands it the other's maps."""
    sources, build = tmp_path / "bpf", tmp_path / "build"
    shutil.copytree(bpf_dir(), sources, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setenv("SYNPROXY_BPF_DIR", str(sources))
    monkeypatch.setenv("SYNPROXY_BUILD_DIR", str(build))
    before = build_object(program)
    with (sources / "backend_maps.h").open("a") as header:
        header.write("/* edited */\n")
    after = build_object(program)
    assert after != before and after.exists()


@pytest.mark.parametrize("source", sorted(path.name for path in bpf_dir().glob("*.bpf.c")))
def test_the_programs_build_without_a_warning(source):
    """The build's warnings are read by nobody once there are some: `#pragma unroll` on a loop clang
    cannot fully unroll warned on every build of the front program, and changed nothing in it."""
    done = subprocess.run([find_clang(), *clang_flags(), f"-I{bpf_dir()}", "-c", str(bpf_dir() / source),
                           "-o", os.devnull], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "warning:" not in done.stderr, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_a_backend_without_an_option_warns_which_configuration_key_matches_it(capsys):
    """The fronts promise SACK, ECN, timestamps and window scaling unless configured not to (`sack`, `ecn`,
    `timestamps`, `window_scaling`): a backend whose sysctls refuse them says which key to set
    (docs/backend.md, "Options the backend has off")."""
    keys = OPTION_KEYS
    with namespaces(unique_name("spws")) as (name,):
        write_sysctls(name, {f"net.ipv4.tcp_{key}": "0" for key in keys})
        with inside(name):
            ensure_sysctls()
    warnings = {line["key"]: line["note"] for line in map(json.loads, capsys.readouterr().err.splitlines())
                if line["event"] == "sysctl_warning"}
    assert sorted(warnings) == sorted(f"net.ipv4.tcp_{key}" for key in keys)
    for key in keys:
        assert warnings[f"net.ipv4.tcp_{key}"].endswith(f"(set {key}: false)"), key


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_an_option_the_configuration_already_turned_off_is_not_warned_about(capsys):
    """Before: a backend whose configuration had `sack: false` and `timestamps: false`, as the warning asks,
    still warned at every start to set them false."""
    with namespaces(unique_name("spwo")) as (name,):
        write_sysctls(name, {f"net.ipv4.tcp_{key}": "0" for key in OPTION_KEYS})
        with inside(name):
            ensure_sysctls(answered=("ecn", "window_scaling"))
    warned = [line["key"] for line in map(json.loads, capsys.readouterr().err.splitlines())
              if line["event"] == "sysctl_warning"]
    assert sorted(warned) == ["net.ipv4.tcp_ecn", "net.ipv4.tcp_window_scaling"]
