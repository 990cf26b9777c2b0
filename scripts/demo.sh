#!/usr/bin/env bash
# The main job on the embedded default: corpus -> permissive LM -> datastore -> eval -> attributed completion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/silo demo --config configs/demo.yaml "$@"
