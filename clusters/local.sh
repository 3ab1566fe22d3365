#!/usr/bin/env bash
# A Ray cluster launched by `ray up` on this machine (Ray's local provider over loopback SSH):
#   clusters/local.sh up       # prints RAY_ADDRESS=http://127.0.0.1:PORT when the head is up
#   clusters/local.sh status   # the alive nodes
#   clusters/local.sh down     # stops this cluster's processes, removes its files
# LOCAL_CLUSTER_DIR picks the cluster's folder (default /tmp/rtr-local-UID). See clusters/local.py.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
"$REPO/setup.sh"
exec "$REPO/.venv/bin/python" "$REPO/clusters/local.py" "$@"
