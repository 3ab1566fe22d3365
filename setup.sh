#!/usr/bin/env bash
# Create .venv with the pinned packages (idempotent). `setup.sh dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
req=requirements.txt
[ "${1:-}" = "dev" ] && req=requirements-dev.txt
# The repo's packages go in editable, so tests, benchmarks and Ray workers import them from here.
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req" &&
       .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; } \
     >/dev/null 2>.venv/pip.log; then
  cat .venv/pip.log >&2
  exit 1
fi
