#!/usr/bin/env bash
# Install everything synproxy, its tests and its lab need on a Debian 12 host. Idempotent: packages
# already present are not fetched again, so `make test` and `make demo` can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang-19 libbpf-dev linux-libc-dev libc6-dev    # build the BPF programs
  iproute2 iptables nftables procps               # netns lab, NFQUEUE rules, sysctls
  libnetfilter-queue-dev gcc python3-dev          # build the netfilterqueue binding
  curl hping3 netsniff-ng tcpdump strace          # clients, flood generators, debugging; strace: a bench test
  apache2-utils                                   # ab: the bench's connection-rate load (benchmarks/README.md)
  nginx                                           # the lab's real HTTP server (synproxy/lab/nginx.py)
  prometheus                                      # scrapes the lab (`synproxy lab up --prometheus`); promtool
  bird2                                           # the lab router's BGP daemon (synproxy/lab/routing.py)
  systemd                                         # systemd-analyze verifies deploy/systemd/ (tests)
  docker.io docker-compose debootstrap            # the docker-compose lab (deploy/README.md)
  make
)

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's postinst starts the services it installs (nginx on port 80 of this host, bird on port 179):
  # the lab runs its own servers and its router's BIRD inside namespaces, so none may start. A policy-rc.d answering 101 forbids it; one the
  # host already has (a container's) is left as it is.
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project itself (editable, so the lab's processes run this checkout) and its test tools.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
