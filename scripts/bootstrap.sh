#!/usr/bin/env bash
# Create .venv (if needed) and install SILO with a CPU torch. Re-running is cheap: the install is
# skipped while requirements-cpu.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.silo-installed
want=$(cat requirements-cpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  start=$(date +%s)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
  echo "$want" > "$stamp"
  echo "installed in $(( $(date +%s) - start ))s"
fi
