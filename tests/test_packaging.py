"""The systemd units (deploy/systemd/) pass `systemd-analyze verify`, each role runs with nothing but its
unit's capabilities, and a node tells systemd it is ready, beats its watchdog and says when it stops
(synproxy/systemd.py, the NOTIFY_SOCKET datagram protocol)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from synproxy.config import ConfigError, load_config
from synproxy.lab.topology import REPO_ROOT
from tests.test_health import config, namespace, running, synproxy, wait_for  # noqa: F401 - namespace is a fixture

UNITS = sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service"))


def test_the_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is in Debian's systemd package")
    synproxy = shutil.which("synproxy")
    assert synproxy, "the project is installed (deploy/install-deps.sh): the units run its entry point"
    copies = []
    for unit in UNITS:  # verify checks that ExecStart's program exists: point it at this host's
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/local/bin/synproxy", synproxy))
        copies.append(str(copy))
    assert [unit.name for unit in UNITS] == ["synproxy-backend.service", "synproxy-front.service"]
    result = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr  # bad keys are warnings only


def with_only(capabilities: list[str]) -> tuple[str, ...]:
    keep = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in capabilities)])
    return "setpriv", f"--bounding-set={keep}", f"--inh-caps={keep}"


def unit_setting(role: str, key: str) -> list[str]:
    text = (REPO_ROOT / "deploy" / "systemd" / f"synproxy-{role}.service").read_text()
    return re.search(rf"^{key}=(.*)$", text, re.MULTILINE).group(1).split()


def bounding_set(role: str) -> list[str]:
    return unit_setting(role, "CapabilityBoundingSet")


# /proc/PID/net tables, by the address family of the sockets they list.
SOCKET_TABLES = {"tcp": "AF_INET", "udp": "AF_INET", "raw": "AF_INET", "tcp6": "AF_INET6", "udp6": "AF_INET6",
                 "raw6": "AF_INET6", "unix": "AF_UNIX", "packet": "AF_PACKET", "netlink": "AF_NETLINK"}


def socket_families(pid: int) -> set[str]:
    """The address families of the sockets ``pid`` holds: its fds' socket inodes, looked up in the tables."""
    inodes = {target[len("socket:["):-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if (target := os.readlink(fd)).startswith("socket:[")}
    return {family for table, family in SOCKET_TABLES.items()
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:] if inodes & set(row.split())}


@pytest.mark.parametrize("role, data_plane", [("front", "xdp"), ("backend", "nfqueue")])
def test_each_role_runs_with_only_its_units_capabilities(namespace, tmp_path, role, data_plane):  # noqa: F811
    """And with only its unit's socket families (RestrictAddressFamilies, a seccomp filter this machine
    cannot apply without systemd: checked on the sockets the ready node holds). Before: the backend's
    TIME_WAIT recycler opened an AF_PACKET socket its unit did not allow."""
    with running(namespace, role, "--config", config(tmp_path, data_plane),
                 prefix=with_only(bounding_set(role))) as process:
        body = wait_for(namespace, "/readyz", 200, seconds=30)
        assert process.poll() is None
        assert all(verdict == "ok" for verdict in body["checks"].values())
        assert socket_families(process.pid) <= set(unit_setting(role, "RestrictAddressFamilies"))


@pytest.mark.parametrize("role, data_plane, dropped", [("front", "xdp", "CAP_SYS_ADMIN"),
                                                       ("front", "nfqueue", "CAP_NET_RAW"),
                                                       ("backend", "nfqueue", "CAP_NET_RAW"),
                                                       ("backend", "nfqueue", "CAP_BPF"),
                                                       ("backend", "nfqueue", "CAP_PERFMON")])
def test_each_capability_of_a_unit_is_needed(namespace, tmp_path, role, data_plane, dropped):  # noqa: F811
    capabilities = [cap for cap in bounding_set(role) if cap != dropped]
    result = subprocess.run(synproxy(namespace, role, "--config", config(tmp_path, data_plane),
                                     prefix=with_only(capabilities)),
                            capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr


def test_a_front_says_ready_beats_its_watchdog_and_says_when_it_stops(namespace, tmp_path):  # noqa: F811
    address = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(address))
        systemd.settimeout(10)
        with running(namespace, "front", "--config", config(tmp_path, "nfqueue"),
                     env={"NOTIFY_SOCKET": str(address)}) as process:
            first = systemd.recv(4096).decode()
            assert first.startswith("READY=1\nSTATUS=")
            assert systemd.recv(4096).decode().startswith("WATCHDOG=1\nSTATUS=")
            wait_for(namespace, "/readyz", 200)
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (message := systemd.recv(4096).decode()) != "STOPPING=1":
                assert time.monotonic() < deadline, message
            assert process.wait(timeout=10) == 0


def test_the_alert_rules_check_and_fire_as_their_tests_say():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is in Debian's prometheus package")
    rules = REPO_ROOT / "deploy" / "prometheus"
    for argv in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(["promtool", *argv], capture_output=True, text=True, timeout=60, check=False,
                                cwd=rules)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_has_a_legend():
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "synproxy-dashboard.json").read_text())
    targets = [target for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert targets and all(target.get("legendFormat") for target in targets), \
        [target["expr"] for target in targets if not target.get("legendFormat")]


def test_the_etc_synproxy_layout_is_what_the_units_and_the_configuration_expect(tmp_path):
    """deploy/README.md's /etc/synproxy, file by file with its mode, loads as one configuration whose
    secrets are the files next to it; the units read its synproxy.yaml; a secret others can read is refused."""
    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    layout = dict(re.findall(r"^  (\S+)\s+(0[0-7]{3})\s", readme[readme.index("/etc/synproxy/\n"):], re.MULTILINE))
    assert layout == {"synproxy.yaml": "0644", "secret.hex": "0600", "flow-secret.hex": "0600",
                      "secret-next.hex": "0600"}
    for unit in UNITS:
        assert "--config /etc/synproxy/synproxy.yaml" in unit.read_text()
    for name, mode in layout.items():
        (tmp_path / name).write_text(os.urandom(32).hex() + "\n")
        (tmp_path / name).chmod(int(mode, 8))
    (tmp_path / "synproxy.yaml").write_text(
        "vips: [198.19.0.10]\nports: [80]\nsecret_file: secret.hex\nflow_secret_file: flow-secret.hex\n"
        "accepted_secret_files: [secret-next.hex]\nbackends: [198.18.20.2]\n")
    loaded = load_config(tmp_path / "synproxy.yaml")
    assert (loaded.secret_file, loaded.flow_secret_file, loaded.accepted_secret_files) == (
        tmp_path / "secret.hex", tmp_path / "flow-secret.hex", (tmp_path / "secret-next.hex",))
    assert len(loaded.salt_schedule().secrets) == 2
    (tmp_path / "secret.hex").chmod(0o644)
    with pytest.raises(ConfigError, match="secret.hex"):
        load_config(tmp_path / "synproxy.yaml").salt_schedule()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once by pip as `pip install .` builds it."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                      ".pytest_cache", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path / "wheels"), str(source)], check=True, timeout=120)
    shutil.rmtree(source)
    (built,) = (tmp_path / "wheels").glob("synproxy-*.whl")
    return built


def test_the_wheel_installs_only_the_synproxy_package(wheel):
    """What `pip install .` puts in site-packages: `synproxy` and its metadata, nothing with a generic
    top-level name. Before: the wheel also carried a top-level `benchmarks` package, which would shadow
    or be shadowed by any other project's. `synproxy bench` runs from a checkout."""
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {name for name in top_level if not name.endswith((".dist-info", ".data"))} == {"synproxy"}


def test_an_installed_package_builds_its_bpf_programs_outside_the_checkout(tmp_path, wheel):
    """`pip install` of the project (a wheel, as pip builds one) into a fresh venv installs the `synproxy`
    command and the BPF sources a node builds its programs from. Before: the wheel had no BPF source, so
    an installed backend failed at start and an installed front fell back to the queue."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=60)
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)
    assert (venv / "bin" / "synproxy").exists()
    check = "import synproxy.bpf.loading as loading; print(loading.__file__); print(loading.build_object('backend'))"
    built = subprocess.run([venv / "bin" / "python", "-c", check],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                           env={**os.environ, "SYNPROXY_BUILD_DIR": str(tmp_path / "objects")})
    assert built.returncode == 0, built.stderr
    module, target = built.stdout.split()
    assert module.startswith(str(venv)) and target.startswith(str(tmp_path / "objects"))
