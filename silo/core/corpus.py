"""Documents and corpora: the record every layer shares, and the readers and writers of corpus files.

A document is ``{id, text, owner, source, license, title?, url?, domain?, split?}``. A corpus is one or
more JSONL files (optionally gzip-compressed), a folder of them, a split of the shipped demo corpus
(``pkg:demo/train``, ``pkg:demo/datastore``, ``pkg:demo/val``, ``pkg:demo/test``), a split of the shipped
second corpus of software manuals (``pkg:manuals/datastore``, ``/val``, ``/test``) or a Hugging Face
dataset (``hf:NAME[:SPLIT]`` or a local dataset folder ``hf:/path``) with the same columns.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .licenses import tier_of

SHIPPED_DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # corpora shipped with the package
DEMO_DATA_DIR = SHIPPED_DATA_DIR / "demo"
DEMO_SPLITS = ("train", "datastore", "val", "test")
# pkg:NAME/SPLIT: the shipped corpora, their splits and the command that rebuilds each
SHIPPED = {"demo": (DEMO_SPLITS, "silo corpus build-demo"),
           "manuals": (("datastore", "val", "test"), "silo corpus build-manuals")}
REQUIRED_FIELDS = ("id", "text", "owner")


class CorpusError(ValueError):
    """A corpus file or document is malformed; the message names the file, line and field."""


@dataclass
class Document:
    id: str
    text: str
    owner: str
    source: str = ""
    license: str = ""
    title: str = ""
    url: str = ""
    domain: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tier(self) -> str:
        return tier_of(self.license)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return {k: v for k, v in d.items() if v != "" or k in REQUIRED_FIELDS}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "Document":
        if not isinstance(obj, dict):
            raise CorpusError(f"{where}: a document must be a JSON object, got {type(obj).__name__}")
        for key in REQUIRED_FIELDS:
            if key not in obj or obj[key] is None:
                raise CorpusError(f"{where}: document is missing the required field '{key}'")
            if not isinstance(obj[key], str):
                raise CorpusError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
        if not obj["id"].strip():
            raise CorpusError(f"{where}: field 'id' is empty")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: ("" if obj.get(k) is None else str(obj[k])) for k in known if k in obj}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(**kwargs, extra=extra)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[Document]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: not valid JSON ({exc.msg})") from None
            yield Document.from_json(obj, where)


def _from_hf(spec: str) -> Iterator[Document]:
    import datasets  # heavy; only when asked for

    name, _, split = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
    for i, row in enumerate(ds):
        yield Document.from_json(dict(row), f"hf:{spec}[{i}]")


def resolve_corpus_path(spec: str) -> list[Path]:
    if spec.startswith("pkg:"):
        name, _, split = spec[len("pkg:"):].partition("/")
        if name not in SHIPPED:
            raise CorpusError(f"unknown shipped corpus '{name}' in '{spec}'; shipped: {', '.join(SHIPPED)}")
        splits, command = SHIPPED[name]
        if split not in splits:
            raise CorpusError(f"unknown {name} split '{split}' in '{spec}'; splits are {', '.join(splits)}")
        path = SHIPPED_DATA_DIR / name / f"{split}.jsonl.gz"
        if not path.exists():
            raise CorpusError(f"{path} is missing; rebuild it with `{command}`")
        return [path]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise CorpusError(f"{path}: folder holds no .jsonl or .jsonl.gz files")
        return files
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    return [path]


def load_documents(specs: str | Iterable[str], domains: Iterable[str] | None = None) -> list[Document]:
    """Load every document of one or more corpus specs; optionally keep only some domains.

    Ids must be unique across the whole corpus: two documents with one id would make provenance and
    removal ambiguous, so that is an error naming both places.
    """
    if isinstance(specs, str):
        specs = [specs]
    keep = set(domains) if domains else None
    docs: list[Document] = []
    seen: dict[str, str] = {}
    for spec in specs:
        it = _from_hf(spec[3:]) if spec.startswith("hf:") else (
            d for p in resolve_corpus_path(spec) for d in read_jsonl(p)
        )
        for doc in it:
            if keep is not None and doc.domain not in keep:
                continue
            if doc.id in seen:
                raise CorpusError(f"duplicate document id '{doc.id}' (in {seen[doc.id]} and {spec})")
            seen[doc.id] = spec
            docs.append(doc)
    return docs


def write_jsonl(docs: Iterable[Document], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    opener = (lambda p: gzip.GzipFile(p, "wb", mtime=0)) if path.suffix == ".gz" else (lambda p: open(p, "wb"))
    with opener(tmp) as fh:
        for d in docs:
            fh.write((json.dumps(d.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)
