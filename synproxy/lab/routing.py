"""The lab router's BGP daemon: Debian's BIRD 2 in the router's namespace, learning the VIPs from every
front (synproxy/front/announce.py) and installing them as one ECMP route (deploy/README.md says why BIRD).

The router is passive (the fronts connect), proposes a 3 s hold time (the least RFC 4271 allows: a frozen
front is withdrawn within 3 s, and BIRD removes its routes up to ~3 s later), accepts a front again 1-5 s
after a failure (BIRD's default waits 60-300 s) and merges the equal routes of all fronts into one multipath kernel route,
which the kernel spreads by the L4 hash as it did the static route before.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import socket
import subprocess

from pyroute2 import IPRoute

from synproxy.netlink import MAIN_TABLE
from synproxy.netns import inside

ROUTER_AS, FRONT_AS = 64512, 64513
HOLD_TIME_SECONDS = 3


def bird_config(router_id: str, fronts: dict[str, str]) -> str:
    """BIRD 2's configuration for the router: one passive session per front (name -> address)."""
    sessions = "".join(f"protocol bgp {name} from fronts {{ neighbor {address} as {FRONT_AS}; }}\n"
                       for name, address in fronts.items())
    return f"""# Written by synproxy/lab/routing.py for the lab router (namespace or docker-compose lab).
log stderr all;
router id {router_id};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths on; }}
template bgp fronts {{
  local as {ROUTER_AS};
  passive on;
  hold time {HOLD_TIME_SECONDS};
  keepalive time 1;
  error wait time 1, 5;   # a front back from a hold-timer expiry is heard again within seconds, not minutes
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
{sessions}"""


def bird_argv(config_path: str, control_socket: str) -> list[str]:
    """BIRD in the foreground, logging to stderr (the lab's log file), with the lab's control socket."""
    binary = shutil.which("bird")
    if binary is None:
        raise FileNotFoundError("bird not found: install Debian's bird2 package (deploy/install-deps.sh)")
    return [binary, "-f", "-c", config_path, "-s", control_socket, "-P", f"{control_socket}.pid"]


def birdc(namespace: str, control_socket: str, *command: str) -> str:
    """A birdc command's answer (e.g. `show protocols`)."""
    return subprocess.run(["ip", "netns", "exec", namespace, "birdc", "-s", control_socket, *command],
                          capture_output=True, text=True, timeout=10, check=True).stdout


def next_hops(namespace: str, vip: str) -> set[str]:
    """The gateways of the router's route to ``vip`` (every path of a multipath one): the fronts it
    sends the VIP's traffic to. Empty when no front announces it."""
    address = ipaddress.ip_address(vip)
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    found = set()
    with inside(namespace), IPRoute() as ipr:
        for msg in ipr.get_routes(family=family, table=MAIN_TABLE):  # a dump: a lookup fails with no route
            if msg.get_attr("RTA_DST") != vip or msg["dst_len"] != address.max_prefixlen:
                continue
            for hop in msg.get_attr("RTA_MULTIPATH") or [msg]:
                gateway = hop.get_attr("RTA_GATEWAY")
                if gateway:
                    found.add(gateway)
    return found


def main() -> None:
    """`python3 -m synproxy.lab.routing --router-id ID NAME=ADDRESS...` prints the router's BIRD configuration:
    the docker-compose lab's router (deploy/docker/start.sh) runs the same BIRD as the namespace lab."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--router-id", required=True, type=ipaddress.IPv4Address)
    parser.add_argument("fronts", nargs="+", metavar="NAME=ADDRESS")
    args = parser.parse_args()
    fronts = {}
    for item in args.fronts:
        name, _, address = item.partition("=")
        try:
            fronts[name] = str(ipaddress.ip_address(address))
        except ValueError:
            parser.error(f"{item!r} is not NAME=ADDRESS")
        if not name.isidentifier():
            parser.error(f"{name!r} is not a BIRD protocol name (letters, digits, _)")
    print(bird_config(str(args.router_id), fronts), end="")


if __name__ == "__main__":
    main()
