#!/usr/bin/env bash
# Run training with every argument passed through to `python -m ray_job.train`.
#   ./start_training.sh --config test --resume latest
# Paths (--config my.yaml, --storage, --audit-dir, data.path) are read from where it is called.
# With RAY_ADDRESS set to a cluster's dashboard (http://HOST:8265), submits a Ray job instead:
#   RAY_ADDRESS=http://127.0.0.1:8265 ./start_training.sh --config production --resume latest
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"
PY=python3
[ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"

if [[ "${RAY_ADDRESS:-}" == http* ]]; then
  RAY="$REPO/.venv/bin/ray"
  if [ ! -x "$RAY" ]; then
    RAY="$(command -v ray || true)"
  fi
  if [ -z "$RAY" ]; then
    echo "error: RAY_ADDRESS=$RAY_ADDRESS submits a Ray job, which needs the 'ray' command: none in" \
         "$REPO/.venv (run ./setup.sh) or on PATH (pip install 'ray[default]')" >&2
    exit 2
  fi
  # The job runs in a copy of $REPO on the cluster: a --config YAML must be inside it, and is
  # handed on relative to it.
  args=()
  while (($#)); do
    arg="$1"; shift
    case "$arg" in
      --config=*) value="${arg#--config=}" ;;
      --config) value="${1-}"; [ $# -gt 0 ] && shift ;;
      *) args+=("$arg"); continue ;;
    esac
    if [[ "$value" == *.yaml || "$value" == *.yml ]]; then
      if [ ! -f "$value" ]; then
        echo "error: --config $value: no such file (from $PWD)" >&2
        exit 2
      fi
      full="$(cd "$(dirname "$value")" && pwd)/$(basename "$value")"
      case "$full" in
        "$REPO"/*) value="${full#"$REPO"/}" ;;
        *) echo "error: --config $value is outside $REPO, the folder shipped to the cluster;" \
                "copy it into $REPO" >&2
           exit 2 ;;
      esac
    fi
    args+=(--config "$value")
  done
  cd "$REPO"
  exec "$RAY" job submit --working-dir "$REPO" -- python -m ray_job.train ${args[@]+"${args[@]}"}
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m ray_job.train "$@"
