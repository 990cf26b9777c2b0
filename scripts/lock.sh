#!/usr/bin/env bash
# Refresh requirements.lock: every package the README's install takes (pyproject.toml's dependencies, the
# `test` extra and the build backend), pinned with hashes, resolved for CPython 3.11 on Linux x86_64 with
# the CPU build of torch. torch itself is pinned in requirements-cpu.txt and left out of the lock: its CPU
# wheel comes from a local folder or the PyTorch index, whose hashes differ from PyPI's CUDA build.
#
#   bash scripts/lock.sh            # re-resolve everything at today's newest allowed versions
#   bash scripts/lock.sh --upgrade-package fastapi   # any extra flags go to `uv pip compile`
#
# Afterwards: bash scripts/test.sh (bootstrap reinstalls from the new lock). SILO_TORCH_WHEELS names the
# folder holding the torch CPU wheel (default /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
torch=$(grep -E '^torch==' requirements-cpu.txt | cut -d= -f3)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tmp/uv" "uv==$UV_VERSION"
uv=("$tmp/uv/bin/uv")
"$PY" - "$tmp/build-system.in" <<'PY'
import sys, tomllib
reqs = tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
PY
echo "torch==$torch+cpu" > "$tmp/torch.txt"
"${uv[@]}" pip compile pyproject.toml "$tmp/build-system.in" --extra test --generate-hashes \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "${SILO_TORCH_WHEELS:-/opt/wheels}" -c "$tmp/torch.txt" --no-emit-package torch \
  --custom-compile-command "bash scripts/lock.sh" --quiet -o "$tmp/requirements.lock" "$@"
# the build backend's requirements came from a temporary file: name their real source
sed "s|-r $tmp/build-system.in|pyproject.toml [build-system]|" "$tmp/requirements.lock" > requirements.lock
echo "wrote requirements.lock ($(grep -cE '^[A-Za-z0-9].*==' requirements.lock) packages; torch $torch from requirements-cpu.txt)"
