#!/bin/sh
# Container entry point: point routes at the lab router, then run the role's own command.
set -eu
role="$1"; shift
if [ -n "${ROUTER:-}" ]; then
  ip route replace default via "$ROUTER"
fi
case "$role" in
  router)
    # The namespace lab's router: BIRD 2 learns the VIP from every front that announces it (front.bgp)
    # and installs one ECMP route through them. Anything else (replies to spoofed sources) ends here,
    # never on Docker's gateway and the host's network.
    ip route replace blackhole default
    peers=""; i=0
    for front in $FRONTS; do peers="$peers front$i=$front"; i=$((i + 1)); done
    python3 -m synproxy.lab.routing --router-id "$ROUTER_ID" $peers > /etc/bird/bird.conf
    mkdir -p /run/bird
    exec bird -f -c /etc/bird/bird.conf -s /run/bird/bird.ctl ;;
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
    exec prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/tmp/prometheus \
      --web.listen-address=0.0.0.0:9090 ;;
  client)
    exec sleep infinity ;;
  *)
    echo "unknown role $role" >&2; exit 2 ;;
esac
