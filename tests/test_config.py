"""Configuration: every kind of mistake gives one clear line naming file, line, key and value, and exit 2."""

import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from pyroute2 import NetNS

from synproxy.cli import main
from synproxy.config import (
    QUEUE_PACKETS_PER_WORKER,
    BgpConfig,
    ConfigError,
    TfoConfig,
    load_config,
    read_secret,
    write_secret,
)
from synproxy.maglev import FLOW_KEY_INFO, derive_flow_key
from synproxy.netns import add_addresses, namespaces, unique_name
from synproxy.salt import derive_key
from tests.lab_fixtures import needs_root

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
vips: [198.19.0.10, 2001:db8:ffff::10]
ports: [80, 443]
secret_file: secret.hex
fronts: [198.18.10.2]
backends: [198.18.20.2, 198.18.21.2]
front:
  queue_num: 3
backend:
  interface: eth0
"""


@pytest.fixture
def workdir(tmp_path):
    write_secret(tmp_path / "secret.hex", b"\xab" * 32)
    return tmp_path


def write(workdir, text):
    path = workdir / "synproxy.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults(workdir):
    config = load_config(write(workdir, GOOD))
    assert [str(v) for v in config.vips] == ["198.19.0.10", "2001:db8:ffff::10"]
    assert config.secret_file == workdir / "secret.hex"
    assert (config.salt_period_seconds, config.clock_skew_seconds, config.server_wscale) == (60.0, 2.0, 7)
    assert (config.encap_port, config.front.queue_num, config.backend.interface) == (6080, 3, "eth0")
    assert config.backend.unknown_flow_resets_per_second == 1000
    assert config.salt_schedule().secrets == (bytes.fromhex("ab" * 32),)



def test_workers_default_to_one_and_auto_is_the_online_cpus(workdir, monkeypatch):
    assert load_config(write(workdir, GOOD)).front.workers == 1
    assert load_config(write(workdir, GOOD.replace("  queue_num: 3", "  workers: 4"))).front.workers == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert load_config(write(workdir, GOOD.replace("  queue_num: 3", "  workers: auto"))).front.workers == 6


def test_the_queue_budget_defaults_to_a_share_per_worker(workdir):
    """front.queue_packets_per_second: auto (the default) is QUEUE_PACKETS_PER_WORKER per worker."""
    assert load_config(write(workdir, GOOD)).front.queue_packets_per_second == QUEUE_PACKETS_PER_WORKER
    for setting, rate in (("workers: 3", 3 * QUEUE_PACKETS_PER_WORKER),
                          ("workers: 3\n  queue_packets_per_second: auto", 3 * QUEUE_PACKETS_PER_WORKER),
                          ("workers: 3\n  queue_packets_per_second: 500", 500)):
        config = load_config(write(workdir, GOOD.replace("  queue_num: 3", f"  {setting}")))
        assert config.front.queue_packets_per_second == rate, setting


@pytest.mark.parametrize("change, expected", [
    (("  queue_num: 3", "  queue_packets_per_second: 0"),
     ":7: front.queue_packets_per_second: must be between 1 and 100000000, or auto, got 0"),
    (("  queue_num: 3", "  queue_packets_per_second: lots"),
     ":7: front.queue_packets_per_second: expected an integer or auto, got 'lots'"),
    (("ports: [80, 443]", "ports: [eighty]"), ":2: ports: expected an integer, got 'eighty'"),
    (("ports: [80, 443]", "ports: [80, 70000]"), ":2: ports: must be between 1 and 65535, got 70000"),
    (("ports: [80, 443]", "ports: 80"), ":2: ports: expected a list, got 80"),
    (("ports: [80, 443]", "ports:"), ":2: ports: required, but given no value"),
    (("  queue_num: 3", "  queue_num: 3\n  colour: blue"), ":8: front.colour: unknown key"),
    (("front:", "frontend: 1\nfront:"), ":6: frontend: unknown key"),
    (("front:\n  queue_num: 3", "front: yes"), ":6: front: expected a mapping of keys to values, got yes"),
    (("  queue_num: 3", "  farm_address: [198.18.10.2]"), ":7: front.farm_address: expected a single value, got a list"),
    (("  queue_num: 3", "  farm_address: 7"), ":7: front.farm_address: expected an IP address, got 7"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.300]"), ":1: vips: not an IP address: '198.19.0.300'"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.10, 198.19.0.10]"),
     ":1: vips: lists the same entry twice"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.18.20.2]"),
     ":1: vips: 198.18.20.2 is also a front or backend address"),
    (("secret_file: secret.hex\n", ""), ": secret_file: required key is missing"),
    (("ports: [80, 443]", "ports: [80, 443]\nclock_skew_seconds: 90"),
     ":3: clock_skew_seconds: must not exceed salt_period_seconds"),
    (("ports: [80, 443]", "ports: [80, 443\n"), "not valid YAML"),
    (("  queue_num: 3", "  data_plane: ebpf"), ":7: front.data_plane: expected one of auto, xdp, tc, nfqueue, got 'ebpf'"),
    (("  queue_num: 3", "  xdp_mode: offload"), ":7: front.xdp_mode: expected one of auto, native, generic, got 'offload'"),
    (("  queue_num: 3", "  interfaces: eth0"), ":7: front.interfaces: expected a list, got eth0"),
    (("  queue_num: 3", "  workers: 0"), ":7: front.workers: must be between 1 and 1024, or auto, got 0"),
    (("  queue_num: 3", "  workers: two"), ":7: front.workers: expected an integer or auto, got 'two'"),
    (("  queue_num: 3", "  workers: true"), ":7: front.workers: expected an integer or auto, got true"),
    (("  queue_num: 3", "  queue_num: 65535\n  workers: 2"),
     ":8: front.workers: 2 workers from queue_num 65535 would need queues beyond 65535"),
    (("  queue_num: 3", "  interfaces: [eth0]\n  fast_path_interfaces: [eth1]"), ":8: front.interfaces: given twice"),
    (("front:", "tfo:\n  enabled: 1\nfront:"), ":7: tfo.enabled: expected true or false, got 1"),
    (("front:", "tfo:\n  key_period_seconds: 30\nfront:"), ":7: tfo.key_period_seconds: must be at least 60.0, got 30"),
    (("front:", "tfo: on\nfront:"), ":6: tfo: expected a mapping of keys to values, got on"),
])
def test_mistakes_name_file_line_and_key(workdir, change, expected, capsys):
    path = write(workdir, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_secret_file_problems(workdir, capsys):
    path = write(workdir, GOOD)
    secret = workdir / "secret.hex"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible to group or others"):
        load_config(path)
    secret.chmod(0o600)
    secret.write_text("not hex")
    with pytest.raises(ConfigError, match="must hold hex text"):
        load_config(path)
    secret.write_text("abcd")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_config(path)
    os.remove(secret)
    with pytest.raises(ConfigError, match="secret file does not exist; make it once, then copy it"):
        load_config(path)
    secret.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot read secret file: Is a directory"):
        load_config(path)


def test_a_written_secret_is_owner_only_whatever_the_umask_or_the_files_mode_was(tmp_path):
    """The tests and the lab write their secrets with write_secret: a touch-then-write leaves the mode to the
    umask when it creates the file, and to what it was when the file exists."""
    fresh, existing = tmp_path / "fresh.hex", tmp_path / "existing.hex"
    existing.write_text("old")
    existing.chmod(0o644)
    umask = os.umask(0o022)
    try:
        for path in (fresh, existing):
            write_secret(path, b"\xcd" * 32)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_secret(path) == b"\xcd" * 32
    finally:
        os.umask(umask)


def test_secret_never_appears_in_errors(workdir, capsys):
    secret_text = "c0ffee" * 8
    (workdir / "secret.hex").write_text(secret_text)
    (workdir / "secret.hex").chmod(0o640)
    assert main(["check-config", str(write(workdir, GOOD))]) == 2
    assert secret_text not in capsys.readouterr().err


def test_missing_and_empty_files(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("")
    assert main(["check-config", str(tmp_path / "empty.yaml")]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_check_config_accepts_the_example(workdir, capsys):
    path = write(workdir, (REPO / "deploy" / "example.yaml").read_text())
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "ok" in captured.out and captured.err == ""


def cli(*args: str, cwd: Path | None = None, namespace: str | None = None) -> subprocess.CompletedProcess:
    """The entry point as an operator runs it (in ``namespace``, when given), with this checkout's code."""
    inside = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.run([*inside, sys.executable, "-m", "synproxy.cli", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def test_example_as_shipped_says_how_to_make_its_secret_and_passes_once_made(tmp_path):
    shipped = REPO / "deploy" / "example.yaml"
    text = shipped.read_text()
    done = cli("check-config", str(shipped))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "secret file does not exist" in done.stderr
    # The comment's command, run where the example lives, makes a secret it accepts.
    command = re.search(r"^#\s+(\(umask 077;.*\))$", text, re.MULTILINE).group(1)
    (tmp_path / "example.yaml").write_text(text)
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    done = cli("check-config", "example.yaml", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    for page in re.findall(r"docs/[a-z-]+\.md", text):
        assert (REPO / page).exists(), page
    assert "metrics_address: 0.0.0.0:9100" in text


@pytest.mark.parametrize("args, expected", [
    (["check-config"], "the following arguments are required: file"),
    (["check-config", "--role", "router", "x.yaml"], "invalid choice: 'router'"),
    (["check-config", "absent.yaml"], "absent.yaml: cannot read config: No such file or directory"),
    # Before: accepted, and --drain gave up at once (-1) or never (nan); --json without --stats was ignored.
    (["front", "--config", "x.yaml", "--drain", "--timeout", "-1"], "expected a positive number of seconds, got '-1'"),
    (["front", "--config", "x.yaml", "--drain", "--timeout", "nan"], "expected a positive number of seconds, got 'nan'"),
    (["front", "--config", "x.yaml", "--json"], "front: --json goes with --stats"),
    (["backend", "--config", "x.yaml", "--json"], "backend: --json goes with --stats"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, expected):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr


def test_version_comes_from_pyproject():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"synproxy {version}\n", "")


@pytest.mark.parametrize("change, expected", [
    (("ports: [80, 443]", "ports: [80, 443]\nsalt_period_seconds: 1"),
     ":3: salt_period_seconds: must be at least 2.0, got 1"),
    (("ports: [80, 443]", "ports: [80, 443]\nsalt_period_seconds: 0"),
     ":3: salt_period_seconds: must be at least 2.0, got 0"),
    (("backends: [198.18.20.2, 198.18.21.2]", "backends: []"), ":5: backends: must not be empty"),
    (("backends: [198.18.20.2, 198.18.21.2]\n", ""), ": backends: required key is missing"),
    (("backends: [198.18.20.2, 198.18.21.2]", "backends: [0.0.0.0]"),
     ":5: backends: 0.0.0.0 is the unspecified address"),
    (("interface: eth0", "interface: eth0\n  unknown_flow_resets_per_second: -1"),
     ":10: backend.unknown_flow_resets_per_second: must be"),
    (("interface: eth0", "interface: eth0\n  unknown_flow_resets_per_second: 1000001"),
     ":10: backend.unknown_flow_resets_per_second: must be"),
] + [
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", f"vips: ['{vip}']"), f":1: vips: {vip} is {described}")
    for vip, described in [("0.0.0.0", "the unspecified address"), ("::", "the unspecified address"),
                           ("224.0.0.1", "a multicast address"), ("ff02::1", "a multicast address"),
                           ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
                           ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
                           ("255.255.255.255", "a reserved address"), ("::ffff:198.19.0.10", "a reserved address")]
] + [
    # Values YAML allows but no node can use.
    (("ports: [80, 443]", "ports: [80, 443]\nsalt_period_seconds: .inf"),
     ":3: salt_period_seconds: expected a finite number of seconds, got inf"),
    (("ports: [80, 443]", "ports: [80, 443]\nclock_skew_seconds: .nan"),
     ":3: clock_skew_seconds: expected a finite number of seconds, got nan"),
    (("  queue_num: 3", "  previous_table_seconds: .inf"), ":7: front.previous_table_seconds: expected a finite"),
    (("  queue_num: 3", "  bgp: {local_as: 1, peer_as: 2, stop_wait_seconds: .inf}"),
     ":7: front.bgp.stop_wait_seconds: expected a finite"),
    (("front:", "tfo: {key_period_seconds: .inf}\nfront:"), ":6: tfo.key_period_seconds: expected a finite"),
    (("ports: [80, 443]", "ports: [80, 443]\nencap_port: !port 6080"),
     ":3: encap_port: could not determine a constructor for the tag '!port'"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bounds_refuse_what_cannot_work(workdir, change, expected, capsys):
    """Before: a 0 s or 1 s period, VIP 0.0.0.0 and no backends all passed check-config; so did .inf
    seconds (a salt period of .inf never changes epoch, a stop wait of .inf never stops), .nan failed
    without file or line, and an unknown tag's error spanned four lines."""
    path = write(workdir, GOOD.replace(*change))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("key, extra", [("secret_file", ""), ("flow_secret_file", "flow_secret_file: other.hex\n"),
                                        ("accepted_secret_files", "accepted_secret_files: [other.hex]\n")])
def test_a_secret_files_error_names_the_key_and_line_that_point_at_it(workdir, key, extra):
    """Before: only the secret's path was named, not which key of which configuration line pointed at it."""
    (workdir / "other.hex").write_text("cd" * 32)
    (workdir / "other.hex").chmod(0o644)
    path = write(workdir, GOOD + extra)
    line = next(number for number, text in enumerate((GOOD + extra).splitlines(), 1) if text.startswith(f"{key}:"))
    secret = workdir / ("secret.hex" if key == "secret_file" else "other.hex")
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}:{line}: {key}: {secret}: secret file is accessible to group or others "
                                 "(mode 644); chmod 600 it")


def test_a_secret_file_that_is_no_file_is_named_for_what_it_is(workdir):
    """Before: a directory of mode 755 was refused as "accessible to group or others", and a FIFO blocked
    the start until something wrote to it."""
    path = write(workdir, GOOD.replace("secret_file: secret.hex", "secret_file: secrets"))
    (workdir / "secrets").mkdir(mode=0o755)
    with pytest.raises(ConfigError, match=r":3: secret_file: .*secrets: cannot read secret file: Is a directory$"):
        load_config(path)
    os.rmdir(workdir / "secrets")
    os.mkfifo(workdir / "secrets", 0o600)
    with pytest.raises(ConfigError, match="secrets: cannot read secret file: not a regular file$"):
        load_config(path)


def test_tfo_is_off_by_default_and_its_key_period_a_day(workdir):
    assert load_config(write(workdir, GOOD)).tfo == TfoConfig(enabled=False, key_period_seconds=86400.0)
    config = load_config(write(workdir, GOOD + "tfo:\n  enabled: true\n  key_period_seconds: 3600\n"))
    assert config.tfo == TfoConfig(enabled=True, key_period_seconds=3600.0)


def test_an_empty_section_or_value_means_the_defaults(workdir):
    """Before: `front:` with nothing under it was refused as `front.: expected a mapping`."""
    text = GOOD.replace("  queue_num: 3\n", "").replace("  interface: eth0\n", "") + "clock_skew_seconds:\n"
    config = load_config(write(workdir, text))
    assert (config.front.queue_num, config.backend.interface, config.clock_skew_seconds) == (0, None, 2.0)


@pytest.mark.parametrize("address", ["0.0.0.0:9100", "[::]:9100", "198.18.10.2:9100", "[2001:db8::1]:9100"])
def test_metrics_address_takes_ip_literals(workdir, address):
    config = load_config(write(workdir, GOOD.replace("  queue_num: 3", f"  metrics_address: '{address}'")))
    assert config.front.metrics_address == address


@pytest.mark.parametrize("address, expected", [
    ("nosuchhost.invalid:9100", "the host must be an IP address (names are not resolved), got 'nosuchhost.invalid'"),
    ("localhost:9100", "got 'localhost'"),
    ("::1:9100", "an IPv6 host goes in brackets"),
    ("0.0.0.0:99999", "the port must be between 1 and 65535, got 99999"),
    ("9100", "expected IP:PORT or [IPV6]:PORT, got '9100'"),
])
def test_metrics_address_refuses_names_at_once(workdir, address, expected, capsys):
    """Before: a host name passed and the node hung 10 s resolving it at start-up, then crashed."""
    path = write(workdir, GOOD.replace("  queue_num: 3", f"  metrics_address: '{address}'"))
    started = time.monotonic()
    assert main(["check-config", str(path)]) == 2
    assert time.monotonic() - started < 1
    err = capsys.readouterr().err
    assert ":7: front.metrics_address: " in err and expected in err


def secret(workdir: Path, name: str, byte: str) -> str:
    (workdir / name).write_text(byte * 32)
    (workdir / name).chmod(0o600)
    return name


def test_accepted_secrets_validate_and_the_old_name_still_works_with_one_warning(workdir, capsys):
    secret(workdir, "next.hex", "cd")
    config = load_config(write(workdir, GOOD + "flow_secret_file: secret.hex\naccepted_secret_files: [next.hex]\n"))
    assert config.salt_schedule().secrets == (bytes.fromhex("ab" * 32), bytes.fromhex("cd" * 32))
    assert config.warnings == ()
    path = write(workdir, GOOD + "flow_secret_file: secret.hex\nretired_secret_files: [next.hex]\n")
    config = load_config(path)
    assert config.accepted_secret_files == (workdir / "next.hex",)
    assert config.warnings == ((f"{path}:11: retired_secret_files: deprecated: renamed accepted_secret_files "
                                "(same meaning); the old name will go"),)
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().err == f"synproxy: warning: {config.warnings[0]}\n"


def test_the_kernel_data_plane_is_on_by_default_and_the_fast_path_key_is_an_alias(workdir):
    config = load_config(write(workdir, GOOD))
    assert (config.front.data_plane, config.front.interfaces, config.front.xdp_mode) == ("auto", (), "auto")
    path = write(workdir, GOOD.replace("  queue_num: 3", "  fast_path_interfaces: [eth0]"))
    config = load_config(path)
    assert (config.front.data_plane, config.front.interfaces) == ("auto", ("eth0",))
    assert config.warnings == ((f"{path}:7: front.fast_path_interfaces: deprecated: renamed front.interfaces "
                               "(same meaning); the old name will go"),)


@pytest.mark.parametrize("extra, expected", [
    ("accepted_secret_files: [next.hex]\nretired_secret_files: [next.hex]\n",
     ":11: accepted_secret_files: given twice"),
    ("accepted_secret_files: [next.hex, other.hex]\n",
     ":10: accepted_secret_files: at most 1, got 2: the backends check 2 secrets"),
    ("accepted_secret_files: [secret.hex]\n", ":10: accepted_secret_files: lists secret_file"),
])
def test_accepted_secret_mistakes(workdir, extra, expected):
    secret(workdir, "next.hex", "cd")
    secret(workdir, "other.hex", "ef")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(workdir, GOOD + extra))


def test_rotating_without_a_flow_secret_warns(workdir):
    secret(workdir, "next.hex", "cd")
    config = load_config(write(workdir, GOOD + "accepted_secret_files: [next.hex]\n"))
    assert len(config.warnings) == 1
    assert ":10: accepted_secret_files: rotating without flow_secret_file" in config.warnings[0]


def test_flow_key_is_secret_and_survives_a_cookie_secret_rotation(workdir):
    """Before: every front hashed flows with a fixed, public key (zeros)."""
    first = load_config(write(workdir, GOOD))
    assert first.flow_key() == derive_key(bytes.fromhex("ab" * 32), FLOW_KEY_INFO) != bytes(16)
    # Pinned to the first secret, the key stays when secret_file moves on.
    secret(workdir, "first.hex", "ab")
    secret(workdir, "next.hex", "cd")
    rotated = load_config(write(workdir, GOOD.replace("secret.hex", "next.hex")
                                + "flow_secret_file: first.hex\naccepted_secret_files: [secret.hex]\n"))
    assert rotated.flow_key() == first.flow_key()
    assert derive_flow_key(bytes.fromhex("cd" * 32)) != first.flow_key()


@pytest.fixture
def node(tmp_path):
    """A namespace standing for a node: 198.18.10.2 on its loopback, 198.19.0.10 blackholed."""
    name = unique_name("cfg")
    with namespaces(name):
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.route("add", dst="198.19.0.10/32", type="blackhole")
        add_addresses(name, "lo", "198.18.10.2/32")
        yield name


@needs_root
def test_role_front_warns_about_a_foreign_farm_address_and_a_vip_without_blackhole(workdir, node):
    path = write(workdir, GOOD.replace("  queue_num: 3", "  farm_address: 198.18.10.2"))
    done = cli("check-config", "--role", "front", str(path), namespace=node)
    # The IPv4 VIP is blackholed, the IPv6 one not; the farm address is local.
    assert done.returncode == 0 and "2 VIPs" in done.stdout
    assert done.stderr == (f"synproxy: warning: {path}:1: vips: 2001:db8:ffff::10 has no blackhole route on this node:"
                           " VIP traffic the queue does not rewrite would be routed back out"
                           " (ip route add blackhole 2001:db8:ffff::10/128)\n")
    path = write(workdir, GOOD.replace("  queue_num: 3", "  farm_address: 198.18.11.2")
                 .replace("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.10]"))
    done = cli("check-config", "--role", "front", str(path), namespace=node)
    assert done.returncode == 0
    assert done.stderr == (f"synproxy: warning: {path}:7: front.farm_address: 198.18.11.2 is not an address of "
                           "this node\n")
    path = write(workdir, GOOD.replace("fronts: [198.18.10.2]", "fronts: [198.18.12.2]"))
    done = cli("check-config", "--role", "front", str(path), namespace=node)
    assert "front.farm_address: not set, and none of `fronts` is local to this node" in done.stderr
    # Before: an interface the node lacks passed; with data_plane auto the front then ran on the queue alone.
    path = write(workdir, GOOD.replace("  queue_num: 3", "  farm_address: 198.18.10.2\n  interfaces: [lo, eth7]")
                 .replace("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.10]"))
    done = cli("check-config", "--role", "front", str(path), namespace=node)
    assert done.returncode == 0
    assert done.stderr == (f"synproxy: warning: {path}:8: front.interfaces: no interface eth7 on this node: the BPF "
                           "programs cannot attach there (front.data_plane auto: the front falls back to the queue)\n")


@needs_root
def test_role_backend_warns_about_vips_not_configured_here(workdir, node):
    path = write(workdir, GOOD.replace("interface: eth0", "interface: lo"))
    done = cli("check-config", "--role", "backend", str(path), namespace=node)
    assert done.returncode == 0
    assert done.stderr == (f"synproxy: warning: {path}:1: vips: 198.19.0.10, 2001:db8:ffff::10 not configured on "
                           "this node: a backend answers from the VIPs (ip address add VIP dev lo)\n")
    add_addresses(node, "lo", "198.19.0.10/32", "2001:db8:ffff::10/128")
    done = cli("check-config", "--role", "backend", str(path), namespace=node)
    assert done.returncode == 0
    assert (done.returncode, done.stderr) == (0, "")
    # Before: an interface the node lacks passed, and the backend then failed to start.
    path = write(workdir, GOOD)
    done = cli("check-config", "--role", "backend", str(path), namespace=node)
    assert done.returncode == 0
    assert done.stderr == (f"synproxy: warning: {path}:9: backend.interface: no interface eth0 on this node: the "
                           "backend will not start unless --interface names another\n")
    # Before: `fronts` left at its default ([]) passed, and the backend dropped every front's packet.
    path = write(workdir, GOOD.replace("interface: eth0", "interface: lo").replace("fronts: [198.18.10.2]\n", ""))
    done = cli("check-config", "--role", "backend", str(path), namespace=node)
    assert done.returncode == 0
    assert done.stderr == (f"synproxy: warning: {path}: fronts: empty: this backend trusts no front, so it drops "
                           "every encapsulated packet (untrusted) and no handshake completes\n")


def test_bgp_is_off_by_default_and_read_with_its_defaults(workdir):
    assert load_config(write(workdir, GOOD)).front.bgp.local_as is None
    config = load_config(write(workdir, GOOD.replace("  queue_num: 3", "  bgp:\n    local_as: 64513\n"
                                                                           "    peer_as: 64512")))
    assert config.front.bgp == BgpConfig(64513, 64512, (), 3, 2.0)


@pytest.mark.parametrize("bgp, expected", [
    ("    local_as: 64513\n", ":8: front.bgp.peer_as: front.bgp needs both local_as and peer_as"),
    ("    local_as: 64513\n    peer_as: 64512\n    peers: ['2001:db8::1']\n",
     ":10: front.bgp.peers: IPv4 addresses only"),
    ("    local_as: 64513\n    peer_as: 64512\n    hold_time_seconds: 2\n",
     ":10: front.bgp.hold_time_seconds: must be between 3 and 65535, got 2"),
])
def test_bgp_mistakes_name_their_line(workdir, bgp, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(workdir, GOOD.replace("  queue_num: 3", "  bgp:\n" + bgp.rstrip("\n"))))
