#!/usr/bin/env bash
# Build the image if needed, make the lab secret if missing, and start the compose lab.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
secret="$here/config/secret.hex"
if [ ! -s "$secret" ]; then
  (umask 077 && python3 -c 'import os; print(os.urandom(32).hex())' > "$secret")
fi
"$here/build-images.sh"
docker-compose -f "$here/../docker-compose.yml" -p "${COMPOSE_PROJECT_NAME:-synproxy}" up -d
