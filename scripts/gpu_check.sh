#!/usr/bin/env bash
# GPU check (not part of CI): the GPU-marked tests and the demo's path on cuda, printing tokens/s.
# Runs offline in a few minutes on one GPU. Packages the machine lacks come as wheels from $SILO_WHEELS
# (default: ./wheels), fetched beforehand on a machine with the package index, e.g.
#   pip download -d wheels --only-binary=:all: --python-version 3.12 faiss-cpu pydantic pydantic-core \
#       bm25s license-expression boolean.py grpcio-health-checking grpcio-reflection protobuf
# The project is installed without dependencies (torch, transformers, ... are the machine's own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${SILO_WHEELS:-wheels}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
if [ -d "$WHEELS" ]; then
  $PY -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
$PY -m pip install --quiet --no-deps --no-build-isolation .
start=$(date +%s)
# from the repository root with `pytest`, not `python -m pytest`: the installed package is tested
pytest -q -m gpu tests/test_batching.py
$PY benchmarks/gpu_check.py --config configs/demo.yaml --out "${OUT:-runs}/gpu_check" --device cuda
echo "gpu check: $(( $(date +%s) - start )) s"
