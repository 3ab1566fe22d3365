#!/usr/bin/env bash
# Create .venv with the pinned packages (idempotent). `setup.sh dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "dev" ] && req=requirements-dev.txt
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" >/dev/null 2>.venv/pip.log; then
  cat .venv/pip.log >&2
  exit 1
fi
