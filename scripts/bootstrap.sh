#!/usr/bin/env bash
# Create .venv (if needed) and install SILO exactly as locked: the CPU build of torch (requirements-cpu.txt),
# then every other package at the version and hash requirements.lock pins (no resolution, nothing newer
# than what was tested), then SILO itself. Re-running is cheap: the install is skipped while those files
# and pyproject.toml are unchanged. Refresh the lock with `bash scripts/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.silo-installed
want=$(cat requirements-cpu.txt requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  start=$(date +%s)
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" -r requirements-cpu.txt
  "${pip[@]}" --require-hashes --no-deps -r requirements.lock
  "${pip[@]}" --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check --disable-pip-version-check >/dev/null \
    || { .venv/bin/python -m pip check; echo "the installed packages do not fit together; see above" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "installed in $(( $(date +%s) - start ))s"
fi
