"""Generate the Python gRPC code for serving/protos into serving/gen (no manual steps).

    python -m silo.serving.codegen            # rewrite serving/gen/
    python -m silo.serving.codegen --check    # exit 1 if serving/gen/ is stale

protoc writes `from silo.v1 import silo_pb2` into the _grpc module (the proto's package path). That
would resolve against *our* `silo` package, so the import is rewritten to be package-relative
(`from . import silo_pb2`). The generated files are committed so that installing SILO needs no protoc.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / "protos"
PROTOS = ["silo/v1/silo.proto"]
GEN_DIR = HERE / "gen"
# files produced per proto, relative to the output root: (generated path, name in serving/gen)
OUTPUTS = [("silo/v1/silo_pb2.py", "silo_pb2.py"), ("silo/v1/silo_pb2.pyi", "silo_pb2.pyi"),
           ("silo/v1/silo_pb2_grpc.py", "silo_pb2_grpc.py")]


def generate(dest: Path) -> list[Path]:
    """Run protoc and write the fixed-up files into `dest`; returns their paths."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(args)}")
        written = []
        for src, name in OUTPUTS:
            text = (Path(tmp) / src).read_text(encoding="utf-8")
            text = re.sub(r"^from silo\.v1 import ", "from . import ", text, flags=re.M)
            out = dest / name
            out.write_text(text, encoding="utf-8")
            written.append(out)
    return written


def stale_files(gen_dir: Path = GEN_DIR) -> list[str]:
    """Names of files in `gen_dir` that differ from a fresh generation (missing counts as stale)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh
                if not (gen_dir / p.name).is_file() or (gen_dir / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m silo.serving.codegen", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether serving/gen is up to date")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated code in {GEN_DIR}: {', '.join(stale)}; run python -m silo.serving.codegen",
                  file=sys.stderr)
            return 1
        print(f"{GEN_DIR} is up to date")
        return 0
    for p in generate(GEN_DIR):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
