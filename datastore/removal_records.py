"""Typed records of the removal state machine (`removal.py`): the request, what it targets, its state.

JSON only at the file edge: `RemovalState.to_json` / `from_json` read and write removals/<id>.json.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields

from .format import DatastoreError, ShardRecord, now

KINDS = ("owner", "documents", "shards")
STATUSES = ("received", "applied", "compacted", "verified")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")  # request ids become file names


class RemovalError(DatastoreError):
    """A removal request is invalid or cannot be carried out; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickles with its field (between processes)
        return type(self), (str(self), self.field)


class RemovalForbidden(RemovalError):
    """The caller may not remove what the request names (another owner's content)."""


def listing(items, limit: int = 20) -> str:
    items = sorted(set(items))
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "") if items else "(none)"


@dataclass
class RemovalRequest:
    """What to remove and who asked. Give exactly one of owner / document_ids / shards (kind is inferred
    when omitted). `request_id` is generated when absent; it is used as a file name, so it is restricted
    to letters, digits, '.', '_' and '-'."""

    kind: str = ""
    owner: str | None = None
    document_ids: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    requester: str = ""
    reason: str = ""
    request_id: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        self.document_ids = list(self.document_ids or [])
        self.shards = list(self.shards or [])
        if not self.kind:
            given = [k for k, v in (("owner", self.owner), ("documents", self.document_ids),
                                    ("shards", self.shards)) if v]
            if len(given) != 1:
                raise RemovalError("give exactly one of owner, document_ids or shards "
                                   f"(got {', '.join(given) or 'none'})", "kind")
            self.kind = given[0]
        if not self.request_id:
            self.request_id = f"rm-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        if not self.created:
            self.created = now()
        self.validate()

    def validate(self) -> None:
        """Check the request on its own (the store check is `RemovalManager.resolve`)."""
        if self.kind not in KINDS:
            raise RemovalError(f"kind must be one of {', '.join(KINDS)} (got {self.kind!r})", "kind")
        if not isinstance(self.request_id, str) or not REQUEST_ID_RE.match(self.request_id):
            raise RemovalError("request_id must be 1-80 letters, digits, '.', '_' or '-' and start with a "
                               f"letter or digit (got {self.request_id!r})", "request_id")
        want = {"owner": "owner", "documents": "document_ids", "shards": "shards"}[self.kind]
        for name in ("owner", "document_ids", "shards"):
            value = getattr(self, name)
            if name == want:
                if name == "owner":
                    if not isinstance(value, str) or not value.strip():
                        raise RemovalError("owner: a removal of kind 'owner' needs a non-empty owner", "owner")
                elif not value or not all(isinstance(x, str) and x.strip() for x in value):
                    raise RemovalError(f"{name}: a removal of kind '{self.kind}' needs a non-empty list of "
                                       f"non-empty strings (got {value!r})", name)
            elif value:
                raise RemovalError(f"{name}: not allowed in a removal of kind '{self.kind}' "
                                   f"(give only {want})", name)
        for name in ("requester", "reason"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RemovalError(f"{name}: required (who asked for the removal, and why)", name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RemovalRequest":
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise RemovalError(f"unknown field(s) {', '.join(sorted(unknown))} in removal request",
                               sorted(unknown)[0])
        return cls(**data)

    @classmethod
    def coerce(cls, obj: "RemovalRequest | dict") -> "RemovalRequest":
        return obj if isinstance(obj, cls) else cls.from_dict(dict(obj))


@dataclass
class ShardTarget:
    """A shard a request touches, as it was when the request was resolved. For a shard whose documents
    are tombstoned, `document_ids` and `removed_entries` say which and how much."""

    name: str
    owner: str
    dir: str
    entries: int
    documents: int
    checksum: str | None = None
    document_ids: list[str] = field(default_factory=list)
    removed_entries: int = 0
    document_owners: list[str] = field(default_factory=list)  # owners of the tombstoned documents
    document_sha256: list[str] = field(default_factory=list)  # their content hashes (a rebuild excludes copies)

    @classmethod
    def of(cls, rec: ShardRecord, **kw) -> "ShardTarget":
        return cls(name=rec.name, owner=rec.owner, dir=rec.dir, entries=int(rec.entries),
                   documents=int(rec.documents), checksum=rec.checksum, **kw)

    def to_json(self, whole: bool) -> dict:
        out = asdict(self)
        if whole:  # a dropped shard: no per-document detail
            for key in ("document_ids", "removed_entries", "document_owners", "document_sha256"):
                out.pop(key)
        return out


@dataclass
class RemovalTargets:
    """What a request removes in the generation it was resolved against."""

    drop_shards: list[ShardTarget]
    drop_documents: list[ShardTarget]
    entries: int
    generation: int

    @property
    def shard_names(self) -> set[str]:
        return {x.name for x in self.drop_shards + self.drop_documents}

    def to_json(self) -> dict:
        return {"drop_shards": [x.to_json(True) for x in self.drop_shards],
                "drop_documents": [x.to_json(False) for x in self.drop_documents],
                "entries": self.entries, "generation": self.generation}

    @classmethod
    def from_json(cls, data: dict) -> "RemovalTargets":
        return cls(drop_shards=[ShardTarget(**x) for x in data["drop_shards"]],
                   drop_documents=[ShardTarget(**x) for x in data["drop_documents"]],
                   entries=int(data["entries"]), generation=int(data["generation"]))


@dataclass
class RemovalState:
    """removals/<request id>.json: a request, what it targets and how far it got."""

    request: RemovalRequest
    status: str
    targets: RemovalTargets
    generation_before: int
    store: str
    timestamps: dict = field(default_factory=dict)
    generation_applied: int | None = None
    generation_compacted: int | None = None
    verification: dict | None = None
    error: str | None = None  # why the work after "applied" failed (persisted; cleared when it succeeds)
    updated: str = ""
    # a cluster's store: a step counts only once its generation reached every replica (`rollouts`: one
    # record per generation rolled out, with each replica's acknowledgement)
    rollout_required: bool = False
    rollouts: list = field(default_factory=list)
    # a quantizer trained on the store's own keys, retrained at compaction without the removed ones
    # (RemovalManager._retrain_quantizer): its file, generation, keys and seconds
    retrained: dict | None = None
    exactness: dict | None = None  # the equivalence check and MUSE report (`silo datastore verify-removal`)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def served_status(self) -> str:
        """The status as every server sees it. Where a rollout is required (a cluster's store), `applied`
        and `compacted` count only once their generation has been rolled out to every replica; until
        then the previous step is reported."""
        if not self.rollout_required or self.status == "received":
            return self.status
        rolled = max((int(r["generation"]) for r in self.rollouts), default=-1)
        if rolled < (self.generation_applied or 0):
            return "received"
        if self.status in ("compacted", "verified") and rolled < (self.generation_compacted or 0):
            return "applied"
        return self.status

    def owners(self) -> set[str]:
        """Owners the request is about: shard owners, the owners of its documents (a domain-sharded shard has
        no owner of its own) and, for owner requests, the request's owner."""
        t = self.targets
        out = {x.owner for x in t.drop_shards + t.drop_documents} | {o for x in t.drop_documents for o in x.document_owners}
        out -= {""}
        if self.request.owner:
            out.add(self.request.owner)
        return out

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["request"] = self.request.to_dict()
        out["targets"] = self.targets.to_json()
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "RemovalState":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["request"] = RemovalRequest.from_dict(data["request"])
        data["targets"] = RemovalTargets.from_json(data["targets"])
        return cls(**data)


@dataclass(frozen=True)
class RemovedShard:
    """A shard a receipt's request dropped whole."""

    name: str
    owner: str
    entries: int
    documents: int

    def to_json(self) -> dict:
        return {"name": self.name, "owner": self.owner, "entries": self.entries, "documents": self.documents}


@dataclass(frozen=True)
class RemovedDocuments:
    """Documents a receipt's request tombstoned (then compacted out) in one shard."""

    shard: str
    document_ids: tuple[str, ...]
    entries: int

    def to_json(self) -> dict:
        return {"shard": self.shard, "document_ids": list(self.document_ids), "entries": self.entries}


@dataclass(frozen=True)
class Removed:
    """What a removal took out of the store: whole shards, documents within shards, entries in all."""

    shards: tuple[RemovedShard, ...]
    documents: tuple[RemovedDocuments, ...]
    entries: int

    @classmethod
    def of(cls, targets: RemovalTargets) -> "Removed":
        return cls(shards=tuple(RemovedShard(x.name, x.owner, x.entries, x.documents) for x in targets.drop_shards),
                   documents=tuple(RemovedDocuments(x.name, tuple(x.document_ids), x.removed_entries)
                                   for x in targets.drop_documents),
                   entries=targets.entries)

    def to_json(self) -> dict:
        return {"shards": [x.to_json() for x in self.shards], "documents": [x.to_json() for x in self.documents],
                "entries": self.entries}

    @classmethod
    def from_json(cls, data: dict) -> "Removed":
        return cls(shards=tuple(RemovedShard(**x) for x in data["shards"]),
                   documents=tuple(RemovedDocuments(x["shard"], tuple(x["document_ids"]), x["entries"])
                                   for x in data["documents"]),
                   entries=data["entries"])


@dataclass(frozen=True)
class ShardVersion:
    """A shard as one manifest generation lists it: a receipt's "before" (`present` None) and "after"
    (`present` True, or False with nothing else when the shard is gone)."""

    name: str
    dir: str | None = None
    entries: int | None = None
    checksum: str | None = None  # sha256 of the shard's shard.json
    present: bool | None = None

    @classmethod
    def of(cls, rec: ShardRecord | ShardTarget, present: bool | None = None) -> "ShardVersion":
        return cls(rec.name, rec.dir, rec.entries, rec.checksum, present)

    @classmethod
    def gone(cls, name: str) -> "ShardVersion":
        return cls(name, present=False)

    def to_json(self) -> dict:
        if self.present is False:
            return {"name": self.name, "present": False}
        out = {"name": self.name, "dir": self.dir, "entries": self.entries, "checksum": self.checksum}
        if self.present is not None:
            out["present"] = self.present
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ShardVersion":
        return cls(**data)


@dataclass(frozen=True)
class Generations:
    """The store generations a removal went through."""

    before: int
    applied: int | None
    compacted: int | None
    current: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JournalLink:
    """A journal record of the request, by sequence number, event and hash (the chain proves the rest)."""

    seq: int
    event: str
    hash: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Receipt:
    """receipts/<request id>.json: what was asked, what was removed (ids, counts, shard checksums before
    and after), generations, timestamps, the verification report and the request's journal records. It
    holds no removed text. `verification` is the report `silo.workflows.removal` made with the model, kept
    as the JSON object it wrote (None until verified). `to_json`/`from_json` are the file and wire form
    (the gRPC GetReceipt sends it as JSON text)."""

    request_id: str
    request: RemovalRequest
    status: str
    store: str
    removed: Removed
    shards_before: tuple[ShardVersion, ...]
    shards_after: tuple[ShardVersion, ...]
    generations: Generations
    timestamps: dict
    verification: dict | None
    journal: tuple[JournalLink, ...]
    rollouts: list | None = None  # a cluster's store: each generation's rollout to the replicas (acks)
    retrained: dict | None = None  # the store-trained quantizer retrained at compaction (RemovalState.retrained)
    # the comparison with a store built without the removed content, and the MUSE-style report (privacy
    # leakage, utility, sustainability, verbatim): `silo datastore verify-removal`; ids, counts and scores only
    exactness: dict | None = None

    @property
    def passed(self) -> bool | None:
        """The verification's verdict; None when the removal was not verified."""
        return None if self.verification is None else bool(self.verification.get("passed"))

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "request": self.request.to_dict(), "status": self.status,
                "store": self.store, "removed": self.removed.to_json(),
                "shards_before": [x.to_json() for x in self.shards_before],
                "shards_after": [x.to_json() for x in self.shards_after],
                "generations": self.generations.to_json(), "timestamps": dict(self.timestamps),
                "verification": self.verification,
                **({"rollouts": list(self.rollouts)} if self.rollouts is not None else {}),
                **({"retrained": self.retrained} if self.retrained is not None else {}),
                **({"exactness": self.exactness} if self.exactness is not None else {}),
                "journal": [x.to_json() for x in self.journal]}

    @classmethod
    def from_json(cls, data: dict) -> "Receipt":
        return cls(request_id=data["request_id"], request=RemovalRequest.from_dict(data["request"]),
                   status=data["status"], store=data["store"], removed=Removed.from_json(data["removed"]),
                   shards_before=tuple(ShardVersion.from_json(x) for x in data["shards_before"]),
                   shards_after=tuple(ShardVersion.from_json(x) for x in data["shards_after"]),
                   generations=Generations(**data["generations"]), timestamps=dict(data["timestamps"]),
                   verification=data.get("verification"),
                   journal=tuple(JournalLink(**x) for x in data["journal"]), rollouts=data.get("rollouts"),
                   retrained=data.get("retrained"), exactness=data.get("exactness"))


@dataclass
class Exclusions:
    """What earlier removals bind every later build of a store to leave out."""

    owners: set[str] = field(default_factory=set)
    shards: set[str] = field(default_factory=set)
    document_ids: set[str] = field(default_factory=set)
    sha256: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def excludes(self, doc_id: str, owner: str, sha256: str, shard: str) -> bool:
        return (owner in self.owners or shard in self.shards or doc_id in self.document_ids
                or sha256 in self.sha256)

    def __bool__(self) -> bool:
        return bool(self.requests)

    def union(self, other: "Exclusions") -> "Exclusions":
        """What both bind a build to leave out (a reference build honours another store's removals too)."""
        return Exclusions(self.owners | other.owners, self.shards | other.shards,
                          self.document_ids | other.document_ids, self.sha256 | other.sha256,
                          self.requests + [r for r in other.requests if r not in self.requests])


def read_exclusions(store_path) -> Exclusions:
    """Every removal recorded in the store at `store_path` (removals/*.json), whatever its status."""
    import json
    from pathlib import Path

    out = Exclusions()
    folder = Path(store_path) / "removals"
    for p in sorted(folder.glob("*.json")) if folder.exists() else []:
        st = RemovalState.from_json(json.loads(p.read_text(encoding="utf-8")))
        out.requests.append(st.request_id)
        r, t = st.request, st.targets
        if r.kind == "owner" and r.owner:
            out.owners.add(r.owner)
        for x in t.drop_shards:
            out.shards.add(x.name)
            if r.kind == "owner" and x.owner:
                out.owners.add(x.owner)
        for x in t.drop_documents:
            out.document_ids |= set(x.document_ids)
            out.sha256 |= set(x.document_sha256)
        out.document_ids |= set(r.document_ids)
    return out
