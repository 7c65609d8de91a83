#!/bin/sh
# Container entry point: point routes at the lab router, then run the role's own command.
set -eu
role="$1"; shift
if [ -n "${ROUTER:-}" ]; then
  ip route replace default via "$ROUTER"
fi
case "$role" in
  router)
    hops=""
    for front in $FRONTS; do hops="$hops nexthop via $front"; done
    ip route replace "$VIP/32" $hops
    exec sleep infinity ;;
  front)
    ip route replace blackhole "$VIP/32"
    exec python3 -m synproxy.cli front --config /etc/synproxy/synproxy.yaml ;;
  backend)
    ip addr add "$VIP/32" dev lo 2>/dev/null || true
    # HTTP is nginx (reuseport, backlog 4096); echo (7) and the TCP_INFO reporter (8080) are Python.
    python3 -m synproxy.lab.nginx --prefix /tmp/nginx --vip "$VIP" --backend "$(hostname)" &
    python3 -m synproxy.lab.servers --name "$(hostname)" &
    exec python3 -m synproxy.cli backend --config /etc/synproxy/synproxy.yaml ;;
  prometheus)
    exec prometheus --config.file=/etc/synproxy/prometheus.yml --storage.tsdb.path=/tmp/prometheus \
      --web.listen-address=0.0.0.0:9090 ;;
  client)
    exec sleep infinity ;;
  *)
    echo "unknown role $role" >&2; exit 2 ;;
esac
