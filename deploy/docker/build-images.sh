#!/usr/bin/env bash
# Build the docker-compose lab's image with no registry: a Debian base made by debootstrap and
# `docker import`, then the project on top. Run from anywhere, as root, with dockerd running.
# The BPF object is built here on the host (the image carries no compiler) and Python wheels that
# Debian does not package are built here too.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${SYNPROXY_IMAGE_WORK:-/var/tmp/synproxy-images}"
image="synproxy-lab:latest"

# The Debian mirror this host already uses (first "URIs:" of a deb822 source, else sources.list).
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt sources" >&2; exit 1; }

packages=python3,python3-pip,python3-yaml,python3-cryptography,python3-cffi-backend,python3-prometheus-client,python3-pyroute2,\
python3-scapy,iproute2,iptables,libnetfilter-queue1,libbpf1,curl,procps,prometheus,nginx,bird2,ca-certificates
# The base image's tag names its package list: a base made before a package was added is not reused.
base_image="synproxy-base:bookworm-$(printf %s "$packages" | sha256sum | cut -c1-12)"

if ! docker image inspect "$base_image" >/dev/null 2>&1; then
  rm -rf "$work/rootfs" && mkdir -p "$work"
  echo "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include="$packages" bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/rootfs" -c . | docker import - "$base_image" >/dev/null
  rm -rf "$work/rootfs"
fi

context="$work/context"
rm -rf "$context" && mkdir -p "$context/wheels"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$context/wheels" siphash24 netfilterqueue
objects=$(cd "$repo" && python3 -c "from synproxy.bpf.loading import build_object
print(build_object('backend'), build_object('front'))")
mkdir -p "$context/bpf/build"
cp -r "$repo/synproxy" "$repo/pyproject.toml" "$repo/README.md" "$context/"
cp "$repo"/bpf/*.c "$repo"/bpf/*.h "$context/bpf/"
cp $objects "$context/bpf/build/"
find "$context" -name __pycache__ -prune -exec rm -rf {} +
cp "$here/Dockerfile" "$here/start.sh" "$context/"
docker build --quiet --build-arg BASE="$base_image" -t "$image" "$context" >/dev/null
echo "$image"
