"""A node's health, served on its metrics port next to /metrics.

``/healthz`` answers 200 while the node's loop is alive; ``/readyz`` answers 200 while the node should get
traffic, which is what a front's BGP announcement follows (synproxy/front/announce.py). The loop runs the
checks at every housekeeping and records them with a heartbeat; the HTTP thread only reads them and judges
the heartbeat's age itself, because a loop that stopped cannot report that it stopped. Both answer a JSON
object naming every check, so an operator sees why.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily

from synproxy.version import version

# A loop that has not beaten for this long is not ready (a front beats every 0.5 s, a backend every
# 0.25 s: four missed beats), and for LIVE_SECONDS not alive.
READY_SECONDS, LIVE_SECONDS = 2.0, 10.0
STARTING = "starting"


class Health:
    """The last checks the loop ran: name -> None when fine, else what is wrong."""

    def __init__(self):
        self.checks: dict[str, str | None] = {"loop": STARTING}
        self.beat_at: float | None = None  # time.monotonic() of the last beat
        self.lock = threading.Lock()

    def beat(self, checks: dict[str, str | None], now: float) -> None:
        with self.lock:
            self.checks, self.beat_at = dict(checks), now

    def state(self, now: float) -> tuple[bool, bool, dict[str, str]]:
        """(alive, ready, every check's verdict: "ok" or the problem)."""
        with self.lock:
            checks, beat_at = dict(self.checks), self.beat_at
        age = None if beat_at is None else now - beat_at
        if age is None:
            checks["loop"] = STARTING
        elif age > READY_SECONDS:
            checks["loop"] = f"no heartbeat for {age:.1f} s"
        else:
            checks.setdefault("loop", None)
        alive = age is None or age <= LIVE_SECONDS
        shown = {name: problem or "ok" for name, problem in checks.items()}
        return alive, all(problem is None for problem in checks.values()), shown

    def ready(self, now: float) -> bool:
        return self.state(now)[1]

    def summary(self, now: float) -> str:
        """One line for systemd's status: "ready", or what is wrong."""
        _, ready, checks = self.state(now)
        return "ready" if ready else "not ready: " + "; ".join(f"{name}: {verdict}" for name, verdict in
                                                             checks.items() if verdict != "ok")

    def answer(self, path: str, now: float) -> tuple[int, dict]:
        alive, ready, checks = self.state(now)
        good = alive if path == "/healthz" else ready
        return (200 if good else 503), {"alive": alive, "ready": ready, "checks": checks}


class ReloadFailures:
    """``synproxy_<role>_config_reload_failures_total``, collected like the nodes' other counters: a
    prometheus_client Counter adds a ``_created`` series no other metric has (docs/metrics.md lists every
    name), which Debian 12's client (0.16, the compose image's) cannot switch off."""

    def __init__(self, role: str, registry: CollectorRegistry):
        self.name, self.count = f"synproxy_{role}_config_reload_failures", 0
        self.help = f"Reloads refused (the configuration or a secret file was wrong): the {role} kept what it had"
        registry.register(self)

    def inc(self) -> None:
        self.count += 1

    def collect(self):
        yield CounterMetricFamily(self.name, self.help, value=self.count)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every second would flood the node's log
        pass


def serve(address: str, registry: CollectorRegistry, health: Health, role: str) -> WSGIServer:
    """/metrics, /healthz and /readyz on ``IP:PORT`` in a daemon thread; the registry also gets the
    process metrics and ``synproxy_build_info``. Raises OSError when the address cannot be bound."""
    ProcessCollector(registry=registry)
    Gauge("synproxy_build_info", "Always 1; the labels say what runs", ["version", "role"],
          registry=registry).labels(version(), role).set(1)
    metrics = make_wsgi_app(registry)

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            status, body = health.answer(path, time.monotonic())
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "application/json")])
            return [json.dumps(body).encode() + b"\n"]
        if path == "/metrics" or path == "/":
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics, /healthz or /readyz\n"]

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    server_class = type("Server", (_Server,), {
        "address_family": socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET})
    server = make_server(host, int(port), application, server_class, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def local_url(address: str, path: str) -> str:
    """The URL another process on this node reaches ``address`` (a metrics_address) by: a wildcard
    host is reached on loopback."""
    host, _, port = address.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"http://{host}:{port}{path}"
