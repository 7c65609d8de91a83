"""The docker-compose lab: build the image locally, bring the topology up, serve real requests.

Skipped, with the reason printed, only where no Docker engine can be started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab_fixtures import needs_root

pytestmark = [pytest.mark.netns, needs_root]
REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
SOCKET = "/run/synproxy-docker.sock"
VIP = "198.19.0.10"


def _engine_answers(env: dict) -> bool:
    return subprocess.run(["docker", "info"], env=env, capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def docker_env():
    """A Docker engine: the one DOCKER_HOST names if it answers, else our own dockerd, stopped afterwards."""
    env = dict(os.environ)
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        pytest.skip("docker or docker-compose is not installed")
    if os.environ.get("DOCKER_HOST") and _engine_answers(env):
        yield env
        return
    if shutil.which("dockerd") is None:
        pytest.skip("no Docker engine (dockerd) on this machine")
    env["DOCKER_HOST"] = f"unix://{SOCKET}"
    started = None
    if not _engine_answers(env):
        log = open("/var/tmp/synproxy-dockerd.log", "ab")  # noqa: SIM115 (lives as long as dockerd)
        started = subprocess.Popen(
            ["dockerd", "--data-root", "/var/lib/synproxy-docker", "--exec-root", "/run/synproxy-docker",
             "-H", f"unix://{SOCKET}", "--pidfile", "/run/synproxy-docker.pid", "--storage-driver", "overlay2"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _engine_answers(env):
            if started.poll() is not None or time.monotonic() > deadline:
                started.kill()
                pytest.skip(f"dockerd would not start here (see {log.name})")
            time.sleep(0.3)
    try:
        yield env
    finally:
        if started is not None:
            started.send_signal(signal.SIGTERM)
            try:
                started.wait(timeout=30)
            except subprocess.TimeoutExpired:
                started.kill()


def readme_commands() -> list[str]:
    """deploy/README.md's compose commands as a script runs them: continuation lines joined, `sudo` dropped
    (the tests run as root), the package install left out (the suite's set-up did it)."""
    readme = (REPO / "deploy" / "README.md").read_text()
    section = readme[readme.index("## The docker-compose lab"):]
    block = section[section.index("```sh\n") + 6:]
    block = block[:block.index("\n```")]
    commands = block.replace("\\\n", " ").splitlines()
    return [c.removeprefix("sudo ") for c in commands if "install-deps.sh" not in c]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def compose(docker_env, tmp_path_factory):
    """The lab brought up by the README's own `up.sh` command, under its own project name, /etc/synproxy
    and Prometheus port; taken down by the README's `down` command (and its volumes)."""
    commands = readme_commands()
    up, down = commands[0], commands[-1]
    assert up.startswith("./deploy/docker/up.sh") and down.endswith(" down")
    env = {**docker_env, "COMPOSE_PROJECT_NAME": f"spc{os.getpid() % 10000}",
           "SYNPROXY_ETC": str(tmp_path_factory.mktemp("etc-synproxy")),
           "SYNPROXY_PROMETHEUS_PORT": str(_free_port())}
    command = ["docker-compose", "-f", str(COMPOSE_FILE)]

    def run(line: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    try:
        started = run(up, timeout=900)
        assert started.returncode == 0, started.stderr[-3000:]
        yield Compose(env, commands[1:-1], run,
                      lambda *argv, check=False: subprocess.run([*command, "exec", "-T", *argv], env=env, check=check,
                                                                capture_output=True, text=True, timeout=60))
    finally:
        run(down, timeout=300)
        subprocess.run([*command, "down", "-v", "--timeout", "5"], env=env, timeout=300, capture_output=True,
                       check=False)


class Compose:
    """The running compose lab: its environment, the README's commands between up and down, a shell
    runner from the checkout's root, and ``docker-compose exec -T``."""

    def __init__(self, env, readme, shell, exec_):
        self.env, self.readme, self.shell, self.exec = env, readme, shell, exec_

    def __call__(self, *argv, check=False):
        return self.exec(*argv, check=check)

    def router_paths(self) -> set[str]:
        """The fronts the router's VIP route goes through (installed by BIRD from their announcements)."""
        route = self("router", "ip", "route", "show", VIP, check=True).stdout
        assert not route or "proto bird" in route, route
        return set(re.findall(r"via (\S+)", route))


FRONTS = {"198.18.110.20", "198.18.110.21", "198.18.110.22"}


def test_up_writes_no_secret_into_the_checkout(compose):
    etc = Path(compose.env["SYNPROXY_ETC"])
    for name in ("secret.hex", "flow-secret.hex"):
        assert (etc / name).stat().st_mode & 0o777 == 0o600
        secret = (etc / name).read_text().strip()
        tracked_or_not = subprocess.run(["git", "grep", "--no-index", "-l", secret, "--", "deploy"], cwd=REPO,
                                        capture_output=True, text=True, check=False)
        assert tracked_or_not.stdout == ""
    assert not list((REPO / "deploy").rglob("*secret*.hex"))
    seen = compose("front0", "stat", "-c", "%a %U", "/etc/synproxy/secret.hex", check=True).stdout.split()
    assert seen == ["600", "root"]


def test_router_learns_the_vip_by_bgp_from_the_three_fronts(compose):
    assert compose.router_paths() == FRONTS
    protocols = compose("router", "birdc", "show", "protocols", check=True).stdout
    assert all(re.search(rf"^front{i}\s+BGP\s.*\sup\s.*Established", protocols, re.MULTILINE) for i in range(3)), protocols


def test_readme_commands_work_from_a_script(compose):
    """Every command of the README between up and down, run by bash with no terminal, succeeds and says
    what the README says it does; the stopped front is withdrawn and announced again once started."""
    outputs = {}
    for line in compose.readme:
        done = compose.shell(line)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        outputs[line] = done.stdout
        if " stop front0" in line:
            assert compose.router_paths() == FRONTS - {"198.18.110.20"}  # withdrawn before it stopped
        if " start front0" in line:
            deadline = time.monotonic() + 15
            while compose.router_paths() != FRONTS:
                assert time.monotonic() < deadline, "front0 was not announced again within 15 s"
                time.sleep(0.5)
    said = {next(line for line in outputs if key in line): key for key in
            ("birdc", "ip route", "curl -sS http://", "flood", "front --config", "backend --config", "api/v1")}
    by_key = {key: outputs[line] for line, key in said.items()}
    assert by_key["birdc"].count("Established") == 3
    assert by_key["ip route"].count("nexthop") == 3
    assert json.loads(by_key["curl -sS http://"])["backend"] in ("backend0", "backend1")
    assert json.loads(by_key["flood"])["sent"] > 0
    assert "bgp 198.18.110.10" in by_key["front --config"] and "announced" in by_key["front --config"]
    assert "created" in by_key["backend --config"]
    announced = json.loads(by_key["api/v1"])["data"]["result"]
    assert {r["metric"]["instance"] for r in announced if r["value"][1] == "1"} == {
        f"198.18.120.{20 + i}:9100" for i in range(3)}


def test_a_killed_front_is_withdrawn_and_comes_back(compose):
    """kill -9: the kernel closes the front's BGP session, BIRD withdraws its path at once; started again,
    it announces again."""
    compose.shell(f"docker-compose -f {COMPOSE_FILE} kill -s SIGKILL front1")
    started = time.monotonic()
    while "198.18.110.21" in compose.router_paths():
        assert time.monotonic() - started < 10, "a killed front still routed after 10 s"
        time.sleep(0.2)
    assert compose.router_paths() == FRONTS - {"198.18.110.21"}
    assert compose("client", "curl", "-sS", "-m", "5", f"http://{VIP}/").returncode == 0
    assert compose.shell(f"docker-compose -f {COMPOSE_FILE} start front1").returncode == 0
    deadline = time.monotonic() + 20
    while compose.router_paths() != FRONTS:
        assert time.monotonic() < deadline, "the restarted front was not announced again within 20 s"
        time.sleep(0.5)


def test_client_requests_reach_both_backends_through_the_fronts(compose):
    deadline = time.monotonic() + 60
    while compose("client", "curl", "-sS", "-m", "2", f"http://{VIP}/").returncode:
        assert time.monotonic() < deadline, "the compose lab never answered"
        time.sleep(1)
    answers = [json.loads(compose("client", "curl", "-sS", "-m", "5", f"http://{VIP}/", check=True).stdout)
               for _ in range(12)]
    assert {a["backend"] for a in answers} == {"backend0", "backend1"}
    assert all(a["client"].startswith("198.18.101.20:") for a in answers)
    echo = compose("client", "python3", "-m", "synproxy.lab.clients", "--target", VIP, "--count", "5", check=True)
    assert json.loads(echo.stdout)["failed"] == 0


def test_nginx_serves_a_large_body_through_the_vip(compose):
    """The backends' HTTP server is nginx (synproxy/lab/nginx.py, in the image): 10 MiB through the fronts."""
    done = compose("client", "curl", "-sS", "-m", "60", "-o", "/dev/null", "-D", "-", "-w", "%{http_code} %{size_download}",
                   f"http://{VIP}/10m", check=True)
    assert "Server: nginx" in done.stdout and done.stdout.endswith(f"200 {10 << 20}")


def test_front_metrics_and_backend_counters(compose):
    compose("client", "curl", "-sS", "-m", "5", f"http://{VIP}/", check=True)
    fronts = [compose("client", "curl", "-sS", f"http://198.18.120.{20 + i}:9100/metrics", check=True).stdout
              for i in range(3)]
    answered = sum(sample.value for text in fronts for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "synproxy_front_packets_total" and sample.labels["outcome"] == "syn_answered")
    assert answered >= 1
    per_vip = Counter()  # over the three fronts
    for text in fronts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "synproxy_front_vip_packets_total":
                    per_vip[sample.labels["vip"], sample.labels["port"], sample.labels["outcome"]] += sample.value
    assert {(VIP, port, outcome) for port in ("80", "7", "8080")
            for outcome in ("syn_answered", "validated", "forwarded")} <= set(per_vip)
    assert per_vip[VIP, "80", "syn_answered"] >= 1
    stats = [json.loads(compose(b, "python3", "-m", "synproxy.cli", "backend", "--config",
                                "/etc/synproxy/synproxy.yaml", "--stats", "--json", check=True).stdout)
             for b in ("backend0", "backend1")]
    assert sum(s["created"] for s in stats) >= 1
    assert sum(s["syn_received"] for s in stats) == 0
