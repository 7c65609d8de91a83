#!/usr/bin/env bash
# Build the image if needed, lay out /etc/synproxy for the containers, and start the compose lab.
# The layout (deploy/README.md, "/etc/synproxy") lives outside the checkout, in $SYNPROXY_ETC (default
# /run/synproxy-compose/etc, a tmpfs: the secrets go with a reboot): the configuration is copied there
# at every start, the secrets are made once, mode 600, and never written into the repository.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
etc="${SYNPROXY_ETC:-/run/synproxy-compose/etc}"
mkdir -p "$etc"
etc="$(cd "$etc" && pwd -P)"
case "$etc/" in
  "$repo"/*) echo "SYNPROXY_ETC=$etc is inside the checkout: the secrets must live elsewhere" >&2; exit 2 ;;
esac
install -m 644 "$here/config/synproxy.yaml" "$etc/synproxy.yaml"
for name in secret.hex flow-secret.hex; do
  if [ ! -s "$etc/$name" ]; then
    (umask 077 && python3 -c 'import os; print(os.urandom(32).hex())' > "$etc/$name")
  fi
done
"$here/build-images.sh"
export SYNPROXY_ETC="$etc"
compose=(docker-compose -f "$here/../docker-compose.yml" -p "${COMPOSE_PROJECT_NAME:-synproxy}")
"${compose[@]}" up -d
# Ready once the router routes the VIP through the three fronts: each announced it by BGP once ready.
for _ in $(seq 60); do
  paths=$("${compose[@]}" exec -T router ip route show 198.19.0.10 2>/dev/null | grep -c nexthop || true)
  [ "$paths" -ge 3 ] && exit 0
  sleep 1
done
echo "after 60 s the router does not route 198.19.0.10 through all three fronts:" \
  "see docker-compose logs router front0 front1 front2" >&2
exit 1
