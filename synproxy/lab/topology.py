"""Build, run and remove the namespace lab.

Every host is a network namespace named ``<lab>-<host>``; hosts are joined by veth pairs to one
router namespace (no bridge, nothing in the root namespace, so the host's FORWARD policy does not
matter). The router spreads traffic to the VIP over the fronts by ECMP with an L4 hash: it learns the
route by BGP (BIRD 2, synproxy/lab/routing.py) from every front that announces it, or, with
``routing="static"``, has it configured. With ``farm_link`` (one front), the front reaches each backend
over a veth of its own instead of through the router, as a farm's fronts reach its backends over the
farm's own network (the benchmark's lab: benchmarks/README.md, "Where a forwarded packet's time
goes"). Fronts and
backends run the product's own commands with one shared configuration. What was created is written
to a state file first, so `down` removes everything even after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from synproxy.bpf.libbpf import XDP_FLAGS_DRV_MODE, BpfObject, xdp_attach
from synproxy.bpf.loading import build_object
from synproxy.config import write_secret
from synproxy.instance import CAP_SYS_ADMIN, has_capability
from synproxy.lab import nginx, routing
from synproxy.netns import add_addresses, inside, link, pids_inside, set_tx_checksum_offload, write_sysctls

STATE_ROOT = Path("/run/synproxy-lab")
VIP = "198.19.0.10"
VIP6 = "2001:db8:ffff::10"
# HTTP is nginx (synproxy/lab/nginx.py); echo and the TCP_INFO reporter are Python (synproxy/lab/servers.py).
HTTP_PORT, ECHO_PORT, TCP_INFO_PORT = 80, 7, 8080
PORTS = (HTTP_PORT, ECHO_PORT, TCP_INFO_PORT)
SPOOFED_SOURCES = "198.18.128.0/17"  # the attacker's spoofed range; the router blackholes replies
REPO_ROOT = Path(__file__).resolve().parents[2]
RT_SCOPE_LINK, NUD_PERMANENT = 253, 0x80
FARM_INTERFACE = "farm"  # a backend's end of its farm link (Lab.farm_link); the front's end is named after it
FRONT_METRICS_PORT, BACKEND_METRICS_PORT, PROMETHEUS_PORT = 9100, 9101, 9090


@dataclass(frozen=True)
class Host:
    name: str
    role: str           # client, attacker, front or backend
    link: int           # its link to the router: 198.18.<link>.0/24 and 2001:db8:<link>::/64

    @property
    def address(self) -> str:
        return f"198.18.{self.link}.2"

    @property
    def router_side(self) -> str:
        return f"198.18.{self.link}.1"

    @property
    def address6(self) -> str:
        return f"2001:db8:{self.link}::2"

    @property
    def router_side6(self) -> str:
        return f"2001:db8:{self.link}::1"


def default_hosts(fronts: int = 3, backends: int = 2) -> list[Host]:
    return [Host("client", "client", 1), Host("attacker", "attacker", 2),
            *(Host(f"front{i}", "front", 10 + i) for i in range(fronts)),
            *(Host(f"backend{i}", "backend", 20 + i) for i in range(backends))]


class LabError(RuntimeError):
    pass


@dataclass
class Lab:
    name: str = "splab"
    hosts: list[Host] = field(default_factory=default_hosts)
    salt_period_seconds: float = 60.0
    clock_skew_seconds: float = 2.0
    prometheus: bool = False
    data_plane: str = "auto"  # the fronts' front.data_plane (docs/front.md)
    routing: str = "bgp"      # bgp: the fronts announce the VIPs to the router's BIRD; static: ECMP routes
    workers: int | None = None  # the fronts' front.workers; None: the default
    tfo_key_period_seconds: float | None = None  # tfo.enabled with this key period; None: TFO off
    farm_link: bool = False   # one front, linked to every backend directly (FARM_INTERFACE on the backends)

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def config_path(self) -> Path:
        return self.state_dir / "synproxy.yaml"

    def config_for(self, data_plane: str) -> Path:
        """The configuration a front runs with another data plane than the lab's (the same otherwise)."""
        if data_plane == self.data_plane:
            return self.config_path
        path = self.state_dir / f"synproxy-{data_plane}.yaml"
        path.write_text(self.config_path.read_text().replace(f"data_plane: {self.data_plane}\n",
                                                             f"data_plane: {data_plane}\n"))
        return path

    def ns(self, host: str) -> str:
        return f"{self.name}-{host}"

    def by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    # --- state -------------------------------------------------------------------------------

    def _state(self) -> dict:
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"namespaces": [], "pids": {}}

    def _save(self, state: dict) -> None:
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=1))

    def _remember(self, key: str, item, value=None) -> None:
        state = self._state()
        if key == "namespaces":
            state["namespaces"].append(item)
        else:
            state["pids"][item] = value
        self._save(state)

    # --- up ----------------------------------------------------------------------------------

    def up(self) -> None:
        if self.farm_link and len(self.by_role("front")) != 1:
            raise LabError(f"a farm link joins one front to the backends, not {len(self.by_role('front'))} fronts")
        _require_root()
        if (self.state_dir / "state.json").exists():
            raise LabError(f"lab {self.name!r} exists: run `synproxy lab down --name {self.name}` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self._save({"namespaces": [], "pids": {}})
        try:
            self._build_network()
            self._write_config()
            if self.routing == "bgp":
                self._start_bird()
            for host in self.by_role("backend"):
                self.start_backend(host.name)
                self.start_nginx(host.name)
                self.start_servers(host.name)
            for host in self.by_role("front"):
                self.start_front(host.name)
            if self.prometheus:
                self._start_prometheus()
        except BaseException:
            self.down()
            raise

    def _build_network(self) -> None:
        router = self.ns("router")
        for namespace in [router, *(self.ns(h.name) for h in self.hosts)]:
            netns.create(namespace)
            self._remember("namespaces", namespace)
            # No duplicate-address detection (addresses, link-local ones too, are usable at once), and
            # IPv6 addresses survive a link going down, as IPv4 ones do.
            write_sysctls(namespace, {"net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
                                      "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                                      "net.ipv6.conf.all.keep_addr_on_down": "1",
                                      "net.ipv6.conf.default.keep_addr_on_down": "1"})
        write_sysctls(router, {"net.ipv4.ip_forward": "1", "net.ipv4.fib_multipath_hash_policy": "1",
                               "net.ipv4.conf.all.ignore_routes_with_linkdown": "1",
                               "net.ipv6.conf.all.forwarding": "1", "net.ipv6.fib_multipath_hash_policy": "1",
                               "net.ipv6.conf.all.ignore_routes_with_linkdown": "1"})
        for host in self.hosts:
            namespace = self.ns(host.name)
            link(namespace, "eth0", router, host.name)
            add_addresses(namespace, "eth0", f"{host.address}/24", f"{host.address6}/64")
            add_addresses(router, host.name, f"{host.router_side}/24", f"{host.router_side6}/64")
            self._default_routes(host)
            if host.role in ("client", "attacker") and self.data_plane != "nfqueue":
                # A veth leaves a local sender's checksums unfinished (the receiver trusts them); from a
                # wire they arrive complete. The programs answer only SYNs whose checksum they can verify,
                # and native XDP sees no sign that a forwarded segment's is unfinished (docs/front.md).
                set_tx_checksum_offload(namespace, "eth0", False)
            if host.role == "front":
                # The fronts run native XDP, as on a NIC: a veth delivers the frames it sends back only
                # when its peer runs an XDP program too (GRO on the peer is not enough: docs/front.md).
                attach_xdp_pass(router, host.name)
            if host.role == "backend":
                add_addresses(namespace, "lo", f"{VIP}/32", f"{VIP6}/128")
                # TIME_WAIT stays on: a 4-tuple reused within it is recycled as the kernel would
                # (docs/backend.md, "4-tuple reuse").
                write_sysctls(namespace, {"net.ipv4.tcp_ecn": "1"})
            if host.role == "front":
                # A front never routes VIP traffic itself: what its queue does not rewrite dies here.
                with NetNS(namespace) as ns:
                    for vip in (f"{VIP}/32", f"{VIP6}/128"):
                        ns.route("add", dst=vip, type="blackhole")
        if self.farm_link:
            self._build_farm_links()
        with NetNS(router) as ns:
            if self.routing == "static":
                fronts = self.by_role("front")
                ns.route("add", dst=f"{VIP}/32", multipath=[{"gateway": h.address} for h in fronts])
                ns.route("add", dst=f"{VIP6}/128", multipath=[{"gateway": h.address6} for h in fronts])
            # Replies to spoofed sources, and anything else unknown, end here.
            ns.route("add", dst="0.0.0.0/0", type="blackhole")
            ns.route("add", dst="::/0", type="blackhole")

    def _build_farm_links(self) -> None:
        """The front's link to each backend: a veth pair, the front's end named after the backend, the
        backend's FARM_INTERFACE, where its data plane attaches. The front's route to the backend's
        address goes over it, so the front's programs send the encapsulated packets there (bpf_fib_lookup
        names the link: an XDP redirect into the backend's receive ring, no router, no socket buffer);
        the backend still answers clients through the router (direct server return). Its neighbour
        entry is permanent: an unresolved one sends the packet to the queue (docs/front.md)."""
        front = self.ns(self.by_role("front")[0].name)
        for backend in self.by_role("backend"):
            link(front, backend.name, self.ns(backend.name), FARM_INTERFACE)
            with NetNS(self.ns(backend.name)) as ns:
                mac = ns.get_links(ns.link_lookup(ifname=FARM_INTERFACE)[0])[0].get_attr("IFLA_ADDRESS")
            with NetNS(front) as ns:
                index = ns.link_lookup(ifname=backend.name)[0]
                ns.route("add", dst=f"{backend.address}/32", oif=index, scope=RT_SCOPE_LINK)
                ns.neigh("replace", dst=backend.address, lladdr=mac, ifindex=index, state=NUD_PERMANENT)

    def _default_routes(self, host: Host) -> None:
        with NetNS(self.ns(host.name)) as ns:
            ns.route("replace", dst="0.0.0.0/0", gateway=host.router_side)
            ns.route("replace", dst="::/0", gateway=host.router_side6)

    def _write_config(self) -> None:
        # The flow secret is its own file: tests rotate secret.hex in place, and the flows must stay on
        # their backends when they do (docs/cookie.md, rotation).
        for name in ("secret.hex", "flow-secret.hex"):
            write_secret(self.state_dir / name, os.urandom(32))
        fronts = ", ".join(h.address for h in self.by_role("front"))
        backends = ", ".join(h.address for h in self.by_role("backend"))
        workers = f"  workers: {self.workers}\n" if self.workers else ""
        text = (
            "# Written by `synproxy lab up`: one configuration for every front and backend.\n"
            f"vips: [{VIP}, {VIP6}]\nports: [{', '.join(map(str, PORTS))}]\nsecret_file: secret.hex\n"
            "flow_secret_file: flow-secret.hex\n"
            f"fronts: [{fronts}]\nbackends: [{backends}]\n"
            f"salt_period_seconds: {self.salt_period_seconds}\nclock_skew_seconds: {self.clock_skew_seconds}\n"
            f"front:\n  metrics_address: 0.0.0.0:{FRONT_METRICS_PORT}\n  data_plane: {self.data_plane}\n"
            f"  xdp_mode: native\n{workers}"
            + (f"  bgp:\n    local_as: {routing.FRONT_AS}\n    peer_as: {routing.ROUTER_AS}\n"
               "    stop_wait_seconds: 1\n" if self.routing == "bgp" else "")
            + f"backend:\n  interface: {FARM_INTERFACE if self.farm_link else 'eth0'}\n"
            + f"  metrics_address: 0.0.0.0:{BACKEND_METRICS_PORT}\n"
            + (f"tfo:\n  enabled: true\n  key_period_seconds: {self.tfo_key_period_seconds}\n"
               if self.tfo_key_period_seconds else ""))
        self.config_path.write_text(text)

    def start_front(self, name: str, data_plane: str | None = None) -> None:
        """Start (or, after a crash, restart) a front's process; it clears rules and programs a dead one
        left. ``data_plane`` overrides the lab's for this start."""
        config = self.config_for(data_plane or self.data_plane)
        self._start(name, [sys.executable, "-m", "synproxy.cli", "front", "--config", str(config)],
                    '"event": "front_started"')
        if self.routing == "bgp":
            self.wait_for_route(name, announced=True)

    # --- BGP ---------------------------------------------------------------------------------------

    @property
    def bird_socket(self) -> str:
        return str(self.state_dir / "bird.ctl")

    def _start_bird(self) -> None:
        """BIRD in the router's namespace, before the fronts: they connect to it as they start."""
        config = self.state_dir / "bird.conf"
        config.write_text(routing.bird_config(self.by_role("client")[0].router_side,
                                              {h.name: h.address for h in self.by_role("front")}))
        try:
            argv = routing.bird_argv(str(config), self.bird_socket)
        except FileNotFoundError as error:
            raise LabError(str(error)) from None
        self._start("router-bird", argv, "<INFO> Started", namespace=self.ns("router"))

    def routed_fronts(self) -> dict[str, bool]:
        """Each front: whether the router's routes to both VIPs go through it (its announcement is installed)."""
        hops = routing.next_hops(self.ns("router"), VIP) | routing.next_hops(self.ns("router"), VIP6)
        return {h.name: h.address in hops and h.address6 in hops for h in self.by_role("front")}

    def wait_for_route(self, front: str, announced: bool, seconds: float = 15) -> float:
        """Wait until the router's VIP routes go through ``front`` (or no longer do); the seconds it took."""
        started = time.monotonic()
        while self.routed_fronts()[front] != announced:
            if time.monotonic() - started > seconds:
                raise LabError(f"the router's VIP routes {'lack' if announced else 'still have'} {front} after "
                               f"{seconds:g} s; router-bird.log and {front}.log say why")
            time.sleep(0.05)
        return time.monotonic() - started

    def announcements(self) -> dict[str, dict]:
        """`lab status`: each front's BGP session as the router's BIRD sees it, and whether its route is
        installed."""
        routed = self.routed_fronts()
        sessions = {}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for line in routing.birdc(self.ns("router"), self.bird_socket, "show", "protocols").splitlines():
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "BGP":
                    sessions[fields[0]] = fields[5]
        return {name: {"session": sessions.get(name, "unknown"), "routed": routed[name]} for name in routed}

    def start_backend(self, name: str) -> None:
        """Start (or restart) a backend's data plane: it attaches its program and fills its maps."""
        self._start(name, [sys.executable, "-m", "synproxy.cli", "backend", "--config", str(self.config_path)],
                    '"event": "backend_attached"')

    def start_servers(self, name: str, fastopen_queue: int | None = None) -> None:
        """A backend's Python servers (synproxy/lab/servers.py: echo, TCP_INFO), their listeners' TFO
        queue ``fastopen_queue`` long (None: their default)."""
        self._start(f"{name}-servers", [sys.executable, "-m", "synproxy.lab.servers", "--name", name,
                                        "--http-port", str(TCP_INFO_PORT), "--echo-port", str(ECHO_PORT),
                                        *(["--fastopen-queue", str(fastopen_queue)] if fastopen_queue else [])],
                    '"event": "servers_ready"', namespace=self.ns(name))

    def start_nginx(self, name: str) -> None:
        """A backend's nginx on the VIPs' HTTP port: its prefix under the lab's state directory, its
        master process recorded as ``<backend>-nginx`` (SIGTERM stops it and its workers)."""
        if shutil.which("nginx") is None:
            raise LabError("nginx not found: install Debian's nginx package (deploy/install-deps.sh)")
        config = nginx.prepare(self.state_dir / f"{name}-nginx", VIP, VIP6, port=HTTP_PORT, backend=name)
        label = f"{name}-nginx"
        try:
            with open(self.state_dir / "logs" / f"{label}.log", "ab") as log_file:
                master = nginx.start(self.ns(name), config, port=HTTP_PORT, stdout=log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except (OSError, RuntimeError) as error:
            raise LabError(f"{label} did not start: {error}") from None
        self._remember("pids", label, master.pid)

    def _start_prometheus(self) -> None:
        """Debian's Prometheus in the router's namespace, scraping every front and backend each second, with
        the shipped alert rules (deploy/prometheus/alerts.yml)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise LabError("prometheus not found: install Debian's prometheus package")
        targets = {"front": [f"{h.address}:{FRONT_METRICS_PORT}" for h in self.by_role("front")],
                   "backend": [f"{h.address}:{BACKEND_METRICS_PORT}" for h in self.by_role("backend")]}
        config = self.state_dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                               for job, addresses in targets.items()],
            "rule_files": [str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yml")]}))
        self._start("prometheus", [binary, f"--config.file={config}",
                                   f"--storage.tsdb.path={self.state_dir / 'prometheus-data'}",
                                   f"--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}"],
                    "Server is ready to receive web requests", namespace=self.ns("router"))
        # Prometheus hands discovered targets to its scrapers at most every 5 s: wait for every node.
        expected = sum(len(addresses) for addresses in targets.values())
        deadline = time.monotonic() + 30
        while len(self.query_prometheus("up == 1")) < expected:
            if time.monotonic() > deadline:
                raise LabError(f"Prometheus did not scrape all {expected} nodes within 30 s")
            time.sleep(0.5)

    def _start(self, label: str, argv: list[str], ready_text: str, namespace: str | None = None) -> None:
        log_path = self.state_dir / "logs" / f"{label}.log"
        start_offset = log_path.stat().st_size if log_path.exists() else 0  # a restart appends
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace or self.ns(label), *argv],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, start_new_session=True)
        self._remember("pids", label, process.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if ready_text in log_path.read_text(errors="replace")[start_offset:]:
                return
            if process.poll() is not None:
                break
            time.sleep(0.05)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise LabError(f"{label} did not start; its log ends:\n{tail}")

    # --- running things inside -----------------------------------------------------------------

    def run(self, host: str, argv: list[str], timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside a host's namespace and wait for it (bounded by ``timeout``)."""
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], capture_output=True, text=True,
                              timeout=timeout, check=check, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, **kwargs)

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, **kwargs)

    def pid(self, label: str) -> int | None:
        return self._state()["pids"].get(label)

    def query_prometheus(self, expression: str) -> list[dict]:
        """An instant query against the lab's Prometheus (reached from inside the router namespace)."""
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with inside(self.ns("router")):
            answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
        if answer.get("status") != "success":
            raise LabError(f"Prometheus query {expression!r} failed: {answer}")
        return answer["data"]["result"]

    def stop_process(self, label: str, sig: int = signal.SIGTERM, wait: float = 10) -> None:
        """Stop one of the lab's own processes by the PID it recorded, escalating to SIGKILL."""
        pid = self.pid(label)
        if pid is None:
            return
        _signal_and_wait(pid, sig, wait)
        state = self._state()
        state["pids"].pop(label, None)
        self._save(state)

    def steer_handshakes(self, source_ports: tuple[int, int], syn_front: str, ack_front: str) -> None:
        """Make the router send SYNs from these client ports to one front and the rest to another.

        Forces cross-node validation: the ACK reaches a front that never saw the SYN.
        """
        first, last = source_ports
        fronts = {h.name: h for h in self.by_role("front")}
        for mark, match, front in ((0x51, ["--syn"], syn_front), (0x52, ["!", "--syn"], ack_front)):
            for tool in ("iptables", "ip6tables"):
                self.run("router", [tool, "-w", "-t", "mangle", "-A", "PREROUTING", "-i", "client", "-p", "tcp",
                                    "--sport", f"{first}:{last}", *match, "-j", "MARK", "--set-mark", str(mark)])
            with NetNS(self.ns("router")) as ns:
                ns.route("replace", dst=f"{VIP}/32", gateway=fronts[front].address, table=mark)
                ns.route("replace", dst=f"{VIP6}/128", gateway=fronts[front].address6, table=mark)
                for family in (socket.AF_INET, socket.AF_INET6):
                    try:
                        ns.rule("add", fwmark=mark, table=mark, priority=100, family=family)
                    except NetlinkError as error:
                        if error.code != errno.EEXIST:  # steered before: the rule is there
                            raise

    def set_link(self, host: str, up: bool) -> None:
        """Take a host's only link down (the node is gone for the router) or back up.

        The kernel deletes a host's routes through a link that goes down; coming up restores them.
        """
        with NetNS(self.ns(host)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], state="up" if up else "down")
        if up:
            self._default_routes(next(h for h in self.hosts if h.name == host))

    def sysctl(self, host: str, settings: dict[str, str]) -> None:
        write_sysctls(self.ns(host), settings)

    # --- down and status -------------------------------------------------------------------------

    def down(self) -> None:
        _require_root()
        state = self._state()
        # Fronts first (they withdraw, answer a second, and remove their rules: all at once), then backends
        # (they detach), then namespaces.
        for label, pid in state["pids"].items():
            if label.startswith("front"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for label, pid in sorted(state["pids"].items(), key=lambda item: not item[0].startswith("front")):
            _signal_and_wait(pid, signal.SIGTERM, 10)
        known = set(state["namespaces"]) | {n for n in netns.listnetns() if n.startswith(f"{self.name}-")}
        # After a crash the state file may be gone: whatever still runs inside the lab's namespaces
        # was started for the lab.
        for namespace in sorted(known):
            for pid in pids_inside(namespace):
                _signal_and_wait(pid, signal.SIGTERM, 5)
        for namespace in sorted(known):
            if namespace in netns.listnetns():
                netns.remove(namespace)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> dict:
        state = self._state()
        processes = {label: _alive(pid) for label, pid in state["pids"].items()}
        return {"name": self.name, "exists": (self.state_dir / "state.json").exists(),
                "namespaces": [n for n in state["namespaces"] if n in netns.listnetns()],
                "processes": processes,
                "data_planes": {h.name: self.data_plane_of(h) for h in self.by_role("front") if processes.get(h.name)},
                **({"announcements": self.announcements()} if (self.state_dir / "bird.conf").exists() else {})}

    def data_plane_of(self, front: Host) -> dict:
        """What a running front says it runs, from its metrics: the mode, and the XDP mode per interface."""
        try:
            samples = scrape(self, front.name, front.address, FRONT_METRICS_PORT)
        except OSError as error:
            return {"error": f"metrics unreachable: {error}"}
        found: dict = {"mode": None, "xdp": {}}
        for (name, labels), value in samples.items():
            labels = dict(labels)
            if name == "synproxy_front_data_plane" and value:
                found["mode"] = labels["mode"]
            elif name == "synproxy_front_xdp_attached" and value:
                found["xdp"][labels["interface"]] = labels["mode"]
        return found


def scrape(lab: Lab, host: str, address: str, port: int) -> dict[tuple, float]:
    """One node's Prometheus metrics, fetched from inside the lab (the client's namespace); ``host`` names
    the node for the reader."""
    with inside(lab.ns("client")):
        text = urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def attach_xdp_pass(namespace: str, interface: str) -> None:
    """bpf/xdp_pass.bpf.c on an interface, natively; it stays attached after the object is closed (the
    kernel holds the program) until the interface goes."""
    program = BpfObject(build_object("xdp_pass"))
    try:
        with inside(namespace):
            xdp_attach(socket.if_nametoindex(interface), program.program_fd("xdp_pass"), XDP_FLAGS_DRV_MODE)
    finally:
        program.close()


def _require_root() -> None:
    if not has_capability(CAP_SYS_ADMIN):
        raise LabError("the lab needs root: it creates and removes network namespaces (CAP_SYS_ADMIN)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_and_wait(pid: int, sig: int, wait: float) -> None:
    """Signal a process this lab started, wait for it, and SIGKILL it if it does not go."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (another `synproxy lab` invocation started it)
            finished = 0 if _alive(pid) else pid
        if finished:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
