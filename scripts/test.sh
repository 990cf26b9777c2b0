#!/usr/bin/env bash
# The test suite (real tiny models, real FAISS, real gRPC on localhost).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/pytest -q tests "$@"  # the installed package (the editable install maps the layers)
