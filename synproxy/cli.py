"""The `synproxy` command: one entry point for every role, errors as one line and an exit code."""

from __future__ import annotations

import argparse
import re
import socket
import sys

from synproxy.config import DATA_PLANES, ConfigError, load_config, role_warnings
from synproxy.firewall import FirewallError
from synproxy.logs import fatal
from synproxy.version import version


def _check_config(args: argparse.Namespace) -> int:
    """Exit 0 with warnings on stderr (one line each), 2 on the first error."""
    config = load_config(args.file)
    warnings = list(config.warnings)
    if args.role:
        from synproxy.netlink import blackholed, local_addresses
        warnings += role_warnings(config, args.role, local_addresses(),
                                  blackholed(config.vips) if args.role == "front" else set(),
                                  {name for _, name in socket.if_nameindex()})
    for warning in warnings:
        print(f"synproxy: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok ({len(config.vips)} VIPs, {len(config.ports)} ports, "
          f"{len(config.backends)} backends, {len(config.fronts)} fronts"
          f"{f', {len(warnings)} warnings' if warnings else ''})")
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from synproxy.selftest import run
    return run(print)


def _backend(args: argparse.Namespace) -> int:
    from synproxy.backend.loader import main
    return main(args)


def _front(args: argparse.Namespace) -> int:
    from synproxy.front.service import main
    return main(args)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.harness import main
    return main(args)


def _lab(args: argparse.Namespace) -> int:
    import json

    from synproxy.lab.demo import run_demo
    from synproxy.lab.topology import Lab, LabError
    lab = Lab(name=args.name, prometheus=args.prometheus, data_plane=args.data_plane, routing=args.routing)
    try:
        if args.action == "up":
            lab.up()
            print(f"lab {lab.name!r} is up; configuration: {lab.config_path}")
            if args.prometheus:
                print(f"Prometheus: `ip netns exec {lab.ns('router')} curl localhost:9090/api/v1/targets`")
        elif args.action == "down":
            lab.down()
            print(f"lab {lab.name!r} is down")
        elif args.action == "status":
            print(json.dumps(lab.status(), indent=1))
        else:
            return run_demo(lab)
    except LabError as error:
        print(f"synproxy: {error}", file=sys.stderr)
        return 1
    return 0


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):  # nan fails too
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _lab_name(text: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", text):
        raise argparse.ArgumentTypeError("1-12 lower-case letters and digits, starting with a letter")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"synproxy {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a configuration file and its secrets; with "
                                "--role, also this node's addresses and routes for that role")
    check.add_argument("--role", choices=["front", "backend"],
                       help="front: farm_address is local and each VIP has a blackhole route; "
                            "backend: the VIPs are configured here")
    check.add_argument("file")
    check.set_defaults(handler=_check_config)

    selftest = commands.add_parser("selftest", help="a handshake through the cookie core, no network")
    selftest.set_defaults(handler=_selftest)

    front = commands.add_parser("front", help="answer SYNs with cookies on this node (NFQUEUE)")
    front.add_argument("--config", required=True, help="YAML configuration file")
    control = front.add_mutually_exclusive_group()
    control.add_argument("--stats", action="store_true",
                         help="print the running front's readiness, BGP sessions and counters (from its metrics)")
    control.add_argument("--drain", action="store_true", help="withdraw the running front's VIPs (SIGUSR1) and "
                         "wait until its traffic has moved to the other fronts")
    control.add_argument("--undrain", action="store_true", help="end a drain (SIGUSR2): announce again")
    front.add_argument("--json", action="store_true", help="with --stats: one JSON object")
    front.add_argument("--timeout", type=_positive_seconds, default=30.0,
                       help="with --drain: give up after this many seconds")
    front.set_defaults(handler=_front)

    lab = commands.add_parser("lab", help="the namespace lab: client, attacker, ECMP router, fronts, backends")
    lab.add_argument("action", choices=["up", "down", "status", "demo"])
    lab.add_argument("--name", default="splab", type=_lab_name, help="lab name, the prefix of its namespaces")
    lab.add_argument("--prometheus", action="store_true", help="with up: also run Prometheus scraping every node")
    lab.add_argument("--data-plane", choices=DATA_PLANES, default="auto",
                     help="with up and demo: the fronts' front.data_plane (docs/front.md; default auto)")
    lab.add_argument("--routing", choices=["bgp", "static"], default="bgp",
                     help="with up and demo: the router learns the VIPs from the fronts by BGP (BIRD; default), "
                          "or has static ECMP routes to every front")
    lab.add_argument("--fast-path", dest="data_plane", action="store_const", const="tc",
                     help="the same as --data-plane tc (the older name)")
    lab.set_defaults(handler=_lab)

    try:
        from benchmarks.options import add_arguments as add_bench_arguments
    except ImportError:  # outside a checkout: the wheel ships only `synproxy` (pyproject.toml)
        add_bench_arguments = None
    if add_bench_arguments is not None:
        bench = commands.add_parser("bench", help="the front against kernel SYN cookies and iptables SYNPROXY")
        add_bench_arguments(bench)
        bench.set_defaults(handler=_bench)

    backend = commands.add_parser("backend", help="run the BPF data plane on a backend")
    backend.add_argument("--config", required=True, help="YAML configuration file")
    backend.add_argument("--interface", help="override backend.interface from the config")
    mode = backend.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true", help="remove the program (after a crash, too)")
    mode.add_argument("--stats", action="store_true", help="print the program's counters")
    backend.add_argument("--json", action="store_true", help="with --stats: one JSON object")
    backend.set_defaults(handler=_backend)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "json", False) and not args.stats:
        parser.error(f"{args.command}: --json goes with --stats")
    # A node's errors are log lines (JSON, like the rest of its log); the tools' are plain lines, and a
    # query of a running node (--stats, --drain, --undrain) is a tool.
    node = args.command in ("front", "backend") and not any(
        getattr(args, query, False) for query in ("stats", "drain", "undrain"))
    if node:
        from synproxy.bpf.libbpf import log_messages
        log_messages()
    try:
        return args.handler(args)
    except ConfigError as error:
        return _error(f"synproxy: {error}", node, 2)
    except FirewallError as error:
        return _error(f"synproxy: cannot install packet-filter rules: {error}", node, 1)
    except SystemExit as error:
        if node and isinstance(error.code, str):
            return _error(error.code, node, 1)
        raise
    except KeyboardInterrupt:
        return 130


def _error(message: str, node: bool, code: int) -> int:
    if node:
        fatal(message)
    else:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
