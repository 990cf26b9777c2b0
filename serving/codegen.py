"""Generate the Python gRPC code for serving/protos into serving/gen (no manual steps).

    python -P -m silo.serving.codegen            # rewrite serving/gen/ (-P: not the checkout root first)
    python -P -m silo.serving.codegen --check    # exit 1 if serving/gen/ is stale or the runtime too old

Staleness is judged by what the files define (descriptors, RPC methods, stub fields), not by their text:
a newer grpcio-tools stamps its own version into the files, which is no reason to regenerate (the lock
pins grpcio-tools anyway, so a fresh install regenerates the committed text byte for byte).

protoc writes `from silo.v1 import silo_pb2` into the _grpc module (the proto's package path). That
would resolve against *our* `silo` package, so the import is rewritten to be package-relative
(`from . import silo_pb2`), and the message classes are registered under the module's real name (not
`silo.v1.silo_pb2`), so that they pickle. The generated files are committed so that installing SILO needs no protoc.
"""

from __future__ import annotations

import argparse
import ast
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


def generate(dest: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc and write the fixed-up files into `dest`; returns their paths."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(args)}")
        written = []
        for src, name in OUTPUTS:
            text = (Path(tmp) / src).read_text(encoding="utf-8")
            text = re.sub(r"^from silo\.v1 import ", "from . import ", text, flags=re.M)
            # the message classes' __module__: the module's real name, so that they pickle (Ray sends gRPC
            # requests to replicas pickled) instead of the proto package's 'silo.v1.silo_pb2', which no
            # import finds
            text = text.replace("BuildTopDescriptorsAndMessages(DESCRIPTOR, 'silo.v1.silo_pb2', _globals)",
                                "BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)")
            out = dest / name
            out.write_text(text, encoding="utf-8")
            written.append(out)
    return written


def _serialized_descriptor(text: str) -> bytes:
    """The FileDescriptorProto bytes a generated _pb2 module registers (`AddSerializedFile(b'...')`)."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile" and node.args:
            return ast.literal_eval(node.args[0])
    raise ValueError("no AddSerializedFile(...) call")


_GRPC_METHOD = re.compile(r"channel\.(unary_unary|unary_stream|stream_unary|stream_stream)\(\s*'([^']+)',\s*"
                          r"request_serializer=[\w.]*?(\w+)\.SerializeToString,\s*"
                          r"response_deserializer=[\w.]*?(\w+)\.FromString")
_PYI_ITEM = re.compile(r"^(\s*)(?:class (\w+)\b|(\w+)_FIELD_NUMBER\s*:)", re.M)


def definitions(name: str, text: str):
    """What a generated file defines, free of the compiler's version stamps and formatting: the message,
    enum and service descriptors (_pb2.py), each RPC's path, kind and message types (_grpc.py), the classes
    and field numbers of the type stubs (.pyi). Two files with equal definitions are interchangeable."""
    if name.endswith("_pb2.py"):
        from google.protobuf import descriptor_pb2

        return descriptor_pb2.FileDescriptorProto.FromString(_serialized_descriptor(text))
    if name.endswith("_grpc.py"):
        return sorted(_GRPC_METHOD.findall(text))
    return [(len(indent), cls or field) for indent, cls, field in _PYI_ITEM.findall(text)]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def runtime_problems(gen_dir: Path = GEN_DIR) -> list[str]:
    """Why the installed grpcio or protobuf cannot import the generated code (each refuses a runtime older
    than the compiler that generated it); empty when they can."""
    import grpc
    from google import protobuf

    problems = []
    grpc_text = (gen_dir / "silo_pb2_grpc.py").read_text(encoding="utf-8")
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_text)
    if m and _version(grpc.__version__) < _version(m.group(1)):
        problems.append(f"silo_pb2_grpc.py needs grpcio >= {m.group(1)}; {grpc.__version__} is installed")
    pb_text = (gen_dir / "silo_pb2.py").read_text(encoding="utf-8")
    m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb_text)
    if m and _version(protobuf.__version__) < tuple(int(x) for x in m.groups()):
        problems.append(f"silo_pb2.py needs protobuf >= {'.'.join(m.groups())}; {protobuf.__version__} is installed")
    return problems


def stale_files(gen_dir: Path = GEN_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of files in `gen_dir` whose definitions differ from a fresh generation of the protos under
    `proto_root` (a missing or unreadable file counts as stale). Compared by what they define, not by text,
    so a newer compiler's version stamp is not staleness; a .proto edited and not regenerated is."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        stale = []
        for p in fresh:
            have = gen_dir / p.name
            try:
                same = definitions(p.name, have.read_text(encoding="utf-8")) == definitions(
                    p.name, p.read_text(encoding="utf-8"))
            except (OSError, ValueError, SyntaxError):
                same = False
            if not same:
                stale.append(p.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m silo.serving.codegen", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether serving/gen is up to date")
    args = ap.parse_args(argv)
    if args.check:
        stale, problems = stale_files(), runtime_problems()
        if stale:
            print(f"stale generated code in {GEN_DIR}: {', '.join(stale)}; run python -m silo.serving.codegen",
                  file=sys.stderr)
        for problem in problems:
            print(problem, file=sys.stderr)
        if stale or problems:
            return 1
        print(f"{GEN_DIR} is up to date")
        return 0
    for p in generate(GEN_DIR):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
