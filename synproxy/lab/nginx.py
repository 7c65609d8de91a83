"""nginx from Debian as a lab backend's real HTTP server (issue 17).

`python3 -m synproxy.lab.nginx --prefix DIR --vip VIP [--vip6 VIP6] --backend NAME` prepares a prefix and
runs nginx in the foreground in the current namespace (the docker-compose lab's backends).

The Python servers top out near 1,600 requests/s, so behind them the proxy's own cost is invisible; nginx
is what users put behind a SYN proxy first. Each backend namespace gets a private prefix under a state
directory (configuration, pid, logs, temp dirs, bodies), so two labs and the host's own nginx never share
a file. The listeners use `reuseport` (one socket per worker, the kernel picks one per flow, also for the
connections the backend program creates from cookies: docs/backend.md) and a realistic backlog.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import time
from pathlib import Path

from synproxy import netns

# Static bodies: small, medium, several segments' worth of window growth, and one large enough for
# path-MTU and long-transfer tests. Served as /1k, /100k, /1m, /10m.
BODY_SIZES = {"1k": 1 << 10, "100k": 100 << 10, "1m": 1 << 20, "10m": 10 << 20}
UPLOAD_PATH = "/upload"  # answers 204 and discards the request body
UPLOAD_LIMIT_BYTES = 1 << 30  # the bench uploads 200 MB (benchmarks/upload.py)
WORKERS = 2  # one per core of the lab machine
BACKLOG = 4096
# The listeners' TCP Fast Open queue (TCP_FASTOPEN qlen): TFO connections pending their client's ACK;
# past it the kernel handles TFO SYNs as any SYN (docs/front.md, "TCP Fast Open").
FASTOPEN_QUEUE = 256
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
STARTUP_SECONDS = 10


def body(size: int) -> bytes:
    """A body's exact bytes: a repeating 0..255 pattern, so a client can check what it received."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def render_config(prefix: Path, vip4: str, vip6: str | None, port: int = 80, workers: int = WORKERS,
                  backlog: int = BACKLOG, user: str | None = None, backend: str = "") -> str:
    """The configuration text for one backend's nginx rooted at ``prefix``.

    ``user``: who the workers run as when the master is root; the caller's own user by default, so
    the workers can read a state directory only its owner may enter (pytest's is mode 0700).
    ``backend``: the name `/` answers with, with the client's address as nginx saw it (the lab's
    clients and tests check which backend answered and that the client's real address arrived).
    ``vip6`` None: IPv4 alone (the docker-compose lab's networks have no IPv6).
    """
    user = user or pwd.getpwuid(os.geteuid()).pw_name
    temp_paths = "\n".join(f"    {name}_temp_path {prefix}/temp/{name};" for name in TEMP_DIRS)
    listen = f"reuseport backlog={backlog} fastopen={FASTOPEN_QUEUE}"
    listen6 = f"        listen [{vip6}]:{port} {listen};\n" if vip6 else ""
    return f"""\
user {user};
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp_paths}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;

    server {{
        listen {vip4}:{port} {listen};
{listen6}        root {prefix}/html;
        # Which worker answered: tests read how the kernel spread connections over the reuseport group.
        add_header X-Worker $pid always;

        location = / {{
            default_type application/json;
            return 200 '{{"backend": "{backend}", "client": "$remote_addr:$remote_port"}}\\n';
        }}

        location = {UPLOAD_PATH} {{
            client_max_body_size {UPLOAD_LIMIT_BYTES};
            return 204;
        }}
    }}
}}
"""


def prepare(state_dir: Path, vip4: str, vip6: str | None, port: int = 80, workers: int = WORKERS,
            backlog: int = BACKLOG, backend: str = "") -> Path:
    """Write the prefix (configuration, bodies, log and temp dirs) under ``state_dir``; its config file."""
    prefix = Path(state_dir).resolve()
    for directory in ("logs", "html", *(f"temp/{name}" for name in TEMP_DIRS)):
        (prefix / directory).mkdir(parents=True, exist_ok=True)
    for name, size in BODY_SIZES.items():
        (prefix / "html" / name).write_bytes(body(size))
    config = prefix / "nginx.conf"
    config.write_text(render_config(prefix, vip4, vip6, port, workers, backlog, backend=backend))
    return config


def start(namespace: str, config: Path, port: int = 80, families: int = 2, workers: int = WORKERS,
          **popen_kwargs) -> subprocess.Popen:
    """Start nginx in ``namespace`` in the foreground, as a child the caller stops by PID (SIGTERM).

    Returns once the master has opened its listeners (one per worker and family with `reuseport`);
    raises RuntimeError with the error log's tail if nginx exits or does not get there in time.
    """
    prefix = config.parent
    process = netns.popen(namespace, command(config), **popen_kwargs)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        listening = netns.run(namespace, ["ss", "-Hltn", f"sport = :{port}"]).stdout
        if len(listening.splitlines()) >= families * workers:
            return process
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()
    log = prefix / "logs" / "error.log"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"nginx in {namespace} did not start listening on port {port}: {tail.strip()}")


def command(config: Path) -> list[str]:
    """nginx in the foreground on ``config``, every path under its prefix."""
    prefix = config.parent
    return ["nginx", "-c", str(config), "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"),
            "-g", "daemon off;"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", type=Path, required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--vip6")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--backend", default="")
    args = parser.parse_args()
    argv = command(prepare(args.prefix, args.vip, args.vip6, args.port, backend=args.backend))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
