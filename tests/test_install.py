"""The install does not depend on the day: requirements.lock agrees with pyproject.toml, and the committed
gRPC code is judged by what the proto defines, not by the compiler version that wrote it."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from silo.serving import codegen

ROOT = Path(__file__).resolve().parent.parent
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
PROJECT = "silo-lm (pyproject.toml)"
BUILD = "pyproject.toml [build-system]"


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {version, hashes, via: set of what asked for it} from a `uv pip compile` output."""
    out: dict[str, dict] = {}
    current = None
    via_block = False
    for line in text.splitlines():
        m = LOCK_LINE.match(line)
        if m:
            current = out[canonicalize_name(m.group(1))] = {"version": m.group(2), "hashes": 0, "via": set()}
            via_block = False
        elif current is None:
            continue
        elif line.strip().startswith("--hash=sha256:"):
            current["hashes"] += 1
        elif line.strip().startswith("# via"):
            rest = line.strip()[len("# via"):].strip()
            via_block = not rest
            if rest:
                current["via"].add(rest)
        elif via_block and line.startswith("    #   "):
            current["via"].add(line[len("    #   "):].strip())
    return out


def project_requirements(pyproject: dict) -> dict[str, tuple[Requirement, str]]:
    """name -> (requirement, who asks for it) for the dependencies, the test extra and the build backend."""
    out = {}
    for spec in pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["test"]:
        req = Requirement(spec)
        out[canonicalize_name(req.name)] = (req, PROJECT)
    for spec in pyproject["build-system"]["requires"]:
        req = Requirement(spec)
        out[canonicalize_name(req.name)] = (req, BUILD)
    return out


def disagreements(pyproject: dict, lock: dict[str, dict], torch_pin: str) -> list[str]:
    """Every way the lock and pyproject.toml (and requirements-cpu.txt's torch) disagree."""
    wanted = project_requirements(pyproject)
    problems = []
    for name, (req, who) in wanted.items():
        if name == "torch":  # pinned by requirements-cpu.txt (its CPU wheel's hash is not PyPI's)
            if not req.specifier.contains(torch_pin, prereleases=True):
                problems.append(f"requirements-cpu.txt pins torch {torch_pin}, outside pyproject's {req}")
            continue
        if name not in lock:
            problems.append(f"{req} is in pyproject.toml but not in requirements.lock")
        elif not req.specifier.contains(lock[name]["version"], prereleases=True):
            problems.append(f"requirements.lock pins {name} {lock[name]['version']}, outside pyproject's {req}")
        elif who not in lock[name]["via"]:
            problems.append(f"requirements.lock does not record {name} as asked for by {who}")
    for name, entry in lock.items():
        if entry["hashes"] == 0:
            problems.append(f"requirements.lock pins {name} without a hash")
        asked = {v for v in entry["via"] if v in (PROJECT, BUILD)}
        if asked and name not in wanted:
            problems.append(f"requirements.lock holds {name} for pyproject.toml, which no longer asks for it")
        if not entry["via"] or not all(v in (PROJECT, BUILD) or canonicalize_name(v) in lock or v == "torch"
                                       for v in entry["via"]):
            problems.append(f"requirements.lock holds {name}, which nothing in the project needs")
    return problems


def _inputs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lock = parse_lock((ROOT / "requirements.lock").read_text(encoding="utf-8"))
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements-cpu.txt").read_text(encoding="utf-8"), re.M).group(1)
    return pyproject, lock, torch_pin


def test_lock_agrees_with_pyproject():
    pyproject, lock, torch_pin = _inputs()
    assert len(lock) > 50 and "grpcio-tools" in lock and "fastapi" in lock
    assert disagreements(pyproject, lock, torch_pin) == [], "refresh the lock: bash scripts/lock.sh"


def test_lock_check_catches_a_dependency_in_one_and_not_the_other():
    pyproject, lock, torch_pin = _inputs()
    added = {**pyproject, "project": {**pyproject["project"],
                                      "dependencies": pyproject["project"]["dependencies"] + ["tinydb>=4"]}}
    assert disagreements(added, lock, torch_pin) == ["tinydb>=4 is in pyproject.toml but not in requirements.lock"]
    # a package the lock holds for another one (rich, for typer) that pyproject starts asking for directly
    direct = {**pyproject, "project": {**pyproject["project"],
                                       "dependencies": pyproject["project"]["dependencies"] + ["rich>=1"]}}
    assert disagreements(direct, lock, torch_pin) == [
        f"requirements.lock does not record rich as asked for by {PROJECT}"]
    dropped = {**pyproject, "project": {**pyproject["project"], "dependencies": [
        d for d in pyproject["project"]["dependencies"] if not d.startswith("fastapi")]}}
    assert disagreements(dropped, lock, torch_pin) == [
        "requirements.lock holds fastapi for pyproject.toml, which no longer asks for it"]
    narrowed = {**pyproject, "project": {**pyproject["project"], "dependencies": [
        "numpy<1.0" if d.startswith("numpy") else d for d in pyproject["project"]["dependencies"]]}}
    assert [p for p in disagreements(narrowed, lock, torch_pin) if "numpy" in p] == [
        f"requirements.lock pins numpy {lock['numpy']['version']}, outside pyproject's numpy<1.0"]
    stray = {**lock, "leftpad": {"version": "1.0", "hashes": 1, "via": set()}}
    assert disagreements(pyproject, stray, torch_pin) == ["requirements.lock holds leftpad, which nothing in the "
                                                          "project needs"]
    torch_range = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert disagreements(pyproject, lock, "1.0") == [
        f"requirements-cpu.txt pins torch 1.0, outside pyproject's {torch_range}"]


def test_generated_code_is_up_to_date():
    assert codegen.stale_files() == [], "run: python -m silo.serving.codegen"
    assert codegen.runtime_problems() == []


def test_staleness_check_catches_a_proto_change_not_regenerated(tmp_path):
    protos = tmp_path / "protos"
    shutil.copytree(codegen.PROTO_ROOT, protos)
    proto = protos / "silo/v1/silo.proto"
    text = proto.read_text(encoding="utf-8")
    # a field added to a message: the descriptor and the type stubs change, the RPCs do not
    proto.write_text(text.replace("message GenerationParams {", "message GenerationParams {\n  bool planted = 99;", 1),
                     encoding="utf-8")
    assert codegen.stale_files(proto_root=protos) == ["silo_pb2.py", "silo_pb2.pyi"]
    # a method added to a service: the gRPC module is stale too
    proto.write_text(text.replace("  rpc ModelInfo(ModelInfoRequest) returns (ModelInfoResponse);",
                                  "  rpc ModelInfo(ModelInfoRequest) returns (ModelInfoResponse);\n"
                                  "  rpc Planted(ModelInfoRequest) returns (stream ModelInfoResponse);", 1),
                     encoding="utf-8")
    assert codegen.stale_files(proto_root=protos) == ["silo_pb2.py", "silo_pb2_grpc.py"]


def test_a_newer_compiler_is_not_staleness_but_an_old_runtime_is_named(tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(codegen.GEN_DIR, gen)
    grpc_file = gen / "silo_pb2_grpc.py"
    text = grpc_file.read_text(encoding="utf-8")
    # what another grpcio-tools release writes differently: its version stamp and the comments
    grpc_file.write_text(re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", "GRPC_GENERATED_VERSION = '1.0.0'", text)
                         .replace("# Generated by the gRPC", "# Generated (another release) by the gRPC"),
                         encoding="utf-8")
    assert codegen.stale_files(gen) == []
    assert codegen.runtime_problems(gen) == []
    grpc_file.write_text(re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", "GRPC_GENERATED_VERSION = '99.0.0'", text),
                         encoding="utf-8")
    assert codegen.stale_files(gen) == []
    problems = codegen.runtime_problems(gen)
    assert len(problems) == 1 and problems[0].startswith("silo_pb2_grpc.py needs grpcio >= 99.0.0")
    (gen / "silo_pb2.pyi").unlink()
    assert codegen.stale_files(gen) == ["silo_pb2.pyi"]
