#!/usr/bin/env bash
# Run training with every argument passed through to `python -m ray_job.train`.
#   ./start_training.sh --config test --resume latest
# With RAY_ADDRESS set to a cluster's dashboard (http://HOST:8265), submits a Ray job instead:
#   RAY_ADDRESS=http://127.0.0.1:8265 ./start_training.sh --config production --resume latest
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [[ "${RAY_ADDRESS:-}" == http* ]]; then
  exec "$(dirname "$PY")/ray" job submit --working-dir . -- python -m ray_job.train "$@"
fi
exec "$PY" -m ray_job.train "$@"
