"""Opt-out you can prove: a store after its removals against a store built from scratch without them.

`verify_exactness(store, heldout)` (what `silo datastore verify-removal` runs):

1. **reference**: the store is built again from the build config its manifest records, into a new folder,
   bound by every removal recorded in the store (`build_datastore(..., bound_by=...)`), with the store's
   gate and, when its shards carry them, RIC blocks cut the same way (a rebuild at the store's own path
   would make the same store);
2. **files** (`datastore/equivalence.py`): manifests, the shared quantizer and every file of every shard;
3. **model**: the search results of probe queries (keys of held-out text and of the removed documents) and
   the served next-token distributions on held-out text, store against reference: equal within
   `DISTRIBUTION_TOLERANCE` in probability;
4. **MUSE-style report** (Shi et al. 2024): verbatim memorisation (the removal's own verification),
   privacy leakage as the Min-K%++ (Zhang et al. 2024) membership AUC of passages of the removed documents
   against passages of never-seen documents of the same kind, on the store and on the reference
   (PrivLeak = (AUC - AUC_ref) / AUC_ref; 0 is ideal), utility per held-out domain relative to the
   reference, and sustainability: the same utility for every earlier removal of the store checked so;
5. **bytes** (`datastore/bytescan.py`): every file of the store folder (journal, receipts and removal
   records included; a ledger file when given) searched for the removed documents' text, token ids, keys
   and codes, recomputed from the corpus with the model (keys are a function of their document alone).

The report (ids, counts and scores only) goes into the request's receipt (`record_exactness`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from silo.core.config import validate
from silo.core.corpus import Document, load_documents
from silo.datastore.blocks import DEFAULT_DENSE, build_blocks, has_blocks
from silo.datastore.build import DatastoreConfig, build_datastore, corpus_groups, slug
from silo.datastore.bytescan import BytePatterns, ScanReport, row_hashes, scan_files
from silo.datastore.equivalence import compare_stores
from silo.datastore.faiss_utils import ivf_of
from silo.datastore.format import GATE_FILE, DatastoreError, Manifest
from silo.datastore.keys import KeyExtractor, encode_document
from silo.datastore.keys_store import open_keys
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalState, read_exclusions
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.model.types import PositionBatch

from .tuning import domain_texts

DISTRIBUTION_TOLERANCE = 1e-5  # largest |p_store - p_reference| of any token at any held-out position
UTILITY_TOLERANCE = 0.01  # a removal keeps utility when every other domain's perplexity is within 1% of the reference's
MIN_K_FRACTION = 0.2  # Min-K%++ averages the lowest 20% of a passage's token scores


@dataclass
class RemovedContent:
    """The removed documents of one request (from the build corpus) and documents of the same kind that were
    never in the store (the non-members of the membership test)."""

    documents: list[Document]
    nonmembers: list[Document]
    missing: list[str] = field(default_factory=list)  # removed documents the corpus no longer holds

    @property
    def domains(self) -> list[str]:
        return sorted({d.domain or "default" for d in self.documents})


# ------------------------------------------------------------------------------------------ reference

def build_config(store: Path, model: str | None = None) -> DatastoreConfig:
    """The build config the store's manifest records (`model` overrides the model path)."""
    manifest = Manifest.read(store)
    recorded = dict(manifest.build.get("config") or {})
    if not recorded:
        raise DatastoreError(f"{store / 'manifest.json'}: records no build config; the store cannot be built again "
                             "to compare with (build it with `silo datastore build`)")
    recorded.update(output_dir=str(store), overwrite=False)
    if model:
        recorded["model"] = model
    return validate(DatastoreConfig, recorded, prefix="datastore", source=str(store / "manifest.json"))


def build_reference(store: Path, out: Path, model: str | None = None) -> Path:
    """Build the store again into `out` (a new folder), leaving out everything the store's removals removed,
    with the store's gate and its RIC blocks (same cut): what a rebuild without the removed content makes."""
    cfg = build_config(store, model).model_copy(update={"output_dir": str(out)})
    build_datastore(cfg, progress=False, bound_by=read_exclusions(store))  # its summary would go to stdout
    if (store / GATE_FILE).exists():
        shutil.copy2(store / GATE_FILE, out / GATE_FILE)
    blocked = [store / r.dir for r in Manifest.read(store).shards if has_blocks(store / r.dir)]
    if blocked:
        from transformers import AutoTokenizer

        info = json.loads((blocked[0] / "blocks" / "blocks.json").read_text(encoding="utf-8"))
        dense = info.get("dense_model")
        build_blocks(out, AutoTokenizer.from_pretrained(cfg.model), info["block_tokens"], info["stride"],
                     info["retrievers"], dense_model=None if dense in (None, DEFAULT_DENSE) else dense, progress=False)
    return out


# ------------------------------------------------------------------------------------------ content

def removed_content(store: Path, state: RemovalState, cfg: DatastoreConfig,
                    nonmember_corpus: list[str] | None = None) -> RemovedContent:
    """The request's removed documents, found in the build corpus as the build took them (the shard's slice),
    and non-members: documents of their domains the store never held (left out by the slice, or from
    `nonmember_corpus`), none of them removed."""
    docs = load_documents(cfg.corpus, cfg.domains)
    groups = corpus_groups(cfg, docs)
    t = state.targets
    whole = {x.name for x in t.drop_shards}
    ids = {i for x in t.drop_documents for i in x.document_ids}
    removed = [d for g, ds in groups.items() for d in ds if slug(g) in whole or d.id in ids]
    missing = sorted(ids - {d.id for d in removed})
    domains = {d.domain or "default" for d in removed}
    held = {d.id for ds in groups.values() for d in ds}
    held_sha = {d.sha256 for ds in groups.values() for d in ds}
    extra = load_documents(nonmember_corpus) if nonmember_corpus else []
    # never in the store: outside every shard's slice (and no copy of a document inside one); they may be
    # the removed owner's other works, which are read here to score, never stored
    nonmembers = [d for d in docs + extra if (d.domain or "default") in domains and d.id not in held
                  and d.sha256 not in held_sha]
    return RemovedContent(removed, list({d.id: d for d in nonmembers}.values()), missing)


def _state(store: Path, request_id: str | None) -> RemovalState:
    mgr = RemovalManager(store)
    states = [s for s in mgr.list() if s.status in ("compacted", "verified")]
    if request_id:
        st = mgr.status(request_id)
        if st.status not in ("compacted", "verified"):
            raise DatastoreError(f"request_id: {request_id!r} is {st.status}; finish it first (silo datastore resume)")
        return st
    if not states:
        raise DatastoreError(f"{store}: no finished removal to verify (silo datastore removals lists them)")
    return states[-1]


# ------------------------------------------------------------------------------------------ model checks

def _search_gap(a: Datastore, b: Datastore, keys: np.ndarray, k: int) -> dict:
    """Top-k neighbours of `keys` in both stores: queries whose lists differ (shard by name, entry, order) and
    the largest distance difference."""
    na, nb = a.search(keys, k), b.search(keys, k)
    names = {s.name: i for i, s in enumerate(b.shards)}
    smap = np.array([names.get(s.name, -1) for s in a.shards] or [-1])
    ka = np.where(na.tokens >= 0, smap[na.shard.astype(np.int64)] * (1 << 40) + na.ids, -1)
    kb = np.where(nb.tokens >= 0, nb.shard.astype(np.int64) * (1 << 40) + nb.ids, -1)
    fin = np.isfinite(na.distances) & np.isfinite(nb.distances)
    gap = float(np.abs(na.distances[fin] - nb.distances[fin]).max()) if fin.any() else 0.0  # no inf - inf
    return {"queries": int(len(keys)), "k": int(k), "queries_differing": int((ka != kb).any(axis=1).sum()),
            "max_distance_change": gap}


def _distribution_gap(lm: SiloLM, ra, rb, pos: PositionBatch, chunk: int = 256) -> tuple[float, np.ndarray, np.ndarray]:
    """The largest |p_a - p_b| of any token at any position under the two served mixtures, and each one's
    log p(target)."""
    ma, mb = ra.mix_positions(pos), rb.mix_positions(pos)
    gap = 0.0
    for s in range(0, len(pos.targets), chunk):
        rows = slice(s, min(len(pos.targets), s + chunk))
        pa, pb = ma.log_rows(pos, rows, ra.k).exp(), mb.log_rows(pos, rows, rb.k).exp()
        gap = max(gap, float((pa - pb).abs().max()))
    return gap, ma.logp, mb.logp


def model_check(lm: SiloLM, ref: Datastore, heldout: dict[str, list[str]], probe_keys: np.ndarray,
                removed_domains: list[str]) -> dict:
    """Search results and served distributions on held-out text (and searches for the removed text's keys),
    store against reference, with the utility (perplexity) of each held-out domain on both."""
    store = lm.store
    ra, rb = lm.retriever("knn", store=store), lm.retriever("knn", store=ref)
    k = ra.k
    search, gap, utility = [], 0.0, {}
    for dom, texts in heldout.items():
        pos = lm.collect_ids([lm.text_ids(t) for t in texts], rows=True)
        if not len(pos.targets):
            continue
        search.append(_search_gap(store, ref, pos.keys[:: max(1, len(pos.keys) // 256)], k))
        g, la, lb = _distribution_gap(lm, ra, rb, pos)
        gap = max(gap, g)
        pa, pb = math.exp(-float(np.mean(la))), math.exp(-float(np.mean(lb)))
        utility[dom] = {"tokens": int(len(la)), "perplexity": round(pa, 4), "reference": round(pb, 4),
                        "ratio": round(pa / pb, 6), "removed_domain": dom in removed_domains}
    if len(probe_keys):
        search.append(_search_gap(store, ref, probe_keys, k))
    differing = sum(s["queries_differing"] for s in search)
    others = [u["ratio"] for u in utility.values() if not u["removed_domain"]] or [1.0]
    return {"search": {"queries": sum(s["queries"] for s in search), "k": int(k), "queries_differing": differing,
                       "max_distance_change": max((s["max_distance_change"] for s in search), default=0.0)},
            "distributions": {"max_probability_change": gap, "tolerance": DISTRIBUTION_TOLERANCE,
                              "passed": gap <= DISTRIBUTION_TOLERANCE},
            "utility": {"domains": utility, "max_change_other_domains": round(max(abs(r - 1) for r in others), 6),
                        "tolerance": UTILITY_TOLERANCE,
                        "within_tolerance": max(abs(r - 1) for r in others) <= UTILITY_TOLERANCE},
            "passed": differing == 0 and gap <= DISTRIBUTION_TOLERANCE}


# ------------------------------------------------------------------------------------------ MUSE

def passages(lm: SiloLM, docs: list[Document], n: int, length: int) -> list[list[int]]:
    """Up to `n` passages of `length` tokens (BOS first), spread evenly over the documents' text."""
    pieces = []
    for d in docs:
        ids = lm.encode(d.text)
        pieces += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    if len(pieces) > n:
        pieces = [pieces[int(i)] for i in np.linspace(0, len(pieces) - 1, n).round()]
    return [[lm.tokenizer.eos_token_id] + p for p in pieces]


def min_k_plus_plus(lm: SiloLM, retriever, ids: list[list[int]], fraction: float = MIN_K_FRACTION,
                    chunk: int = 256) -> np.ndarray:
    """Min-K%++ of each passage under `retriever`'s served mixture (None: the LM alone): per token
    (log p(x) - mu) / sigma, mu and sigma the mean and spread of log p over the next-token distribution;
    the passage's score is the mean of its lowest `fraction` (higher: more likely seen)."""
    pos = lm.collect_ids(ids, rows=True)
    mixed = retriever.mix_positions(pos) if retriever is not None else None
    z = np.zeros(len(pos.targets))
    for s in range(0, len(pos.targets), chunk):
        rows = slice(s, min(len(pos.targets), s + chunk))
        lp = mixed.log_rows(pos, rows, retriever.k) if mixed is not None else \
            torch.from_numpy(pos.logp_rows[rows]).double()
        p = lp.exp()
        plp = torch.where(p > 0, p * lp, torch.zeros_like(p))
        mu = plp.sum(1)
        var = torch.where(p > 0, plp * lp, torch.zeros_like(p)).sum(1) - mu ** 2
        target = (mixed.logp if mixed is not None else pos.logp_lm)[rows]
        z[rows] = (torch.from_numpy(np.asarray(target, np.float64)) - mu).numpy() / np.sqrt(np.maximum(var.numpy(), 1e-12))
    out = np.zeros(len(ids))
    for i in range(len(ids)):
        zi = np.sort(z[pos.text_index == i])
        out[i] = float(zi[: max(1, int(math.ceil(fraction * len(zi))))].mean()) if len(zi) else 0.0
    return out


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float | None:
    """P(a member scores above a non-member), ties counting half (the ROC AUC)."""
    if not len(members) or not len(nonmembers):
        return None
    diff = np.asarray(members)[:, None] - np.asarray(nonmembers)[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def privacy_leak(lm: SiloLM, ref: Datastore, content: RemovedContent, n: int = 32, length: int = 128) -> dict:
    """Min-K%++ membership AUC of the removed documents' passages against never-seen documents of the same
    kind, on the store (after removal), the reference (built without them) and the LM alone; PrivLeak =
    (AUC - AUC_ref) / AUC_ref."""
    members, nonmembers = passages(lm, content.documents, n, length), passages(lm, content.nonmembers, n, length)
    out = {"members": len(members), "nonmembers": len(nonmembers), "passage_tokens": length,
           "k_fraction": MIN_K_FRACTION, "nonmember_documents": len(content.nonmembers)}
    if not members or not nonmembers:
        out.update(priv_leak=None, reason="no never-seen documents of the removed documents' kind to compare with"
                   if members else "no removed text to test")
        return out
    for name, retriever in (("store", lm.retriever("knn")), ("reference", lm.retriever("knn", store=ref)),
                            ("parametric", None)):
        out[f"auc_{name}"] = round(auc(min_k_plus_plus(lm, retriever, members),
                                       min_k_plus_plus(lm, retriever, nonmembers)), 6)
    ref_auc = out["auc_reference"]
    out["priv_leak"] = round((out["auc_store"] - ref_auc) / ref_auc, 6) if ref_auc else None
    if not ref_auc:
        out["reason"] = "the reference's AUC is 0 (PrivLeak divides by it): compare auc_store and auc_reference"
    return out


def sustainability(store: Path, request_id: str, utility: dict) -> dict:
    """The utility change of every removal of the store checked against a rebuild, in order (this one last)."""
    rows = []
    for st in RemovalManager(store).list():
        u = utility if st.request_id == request_id else ((st.exactness or {}).get("muse") or {}).get("utility")
        if u:
            rows.append({"request_id": st.request_id, "max_change_other_domains": u["max_change_other_domains"],
                         "within_tolerance": u["within_tolerance"]})
    return {"removals": rows, "checked": len(rows), "all_within_tolerance": all(r["within_tolerance"] for r in rows),
            "max_change_other_domains": max((r["max_change_other_domains"] for r in rows), default=0.0)}


def verbatim_of(state: RemovalState) -> dict | None:
    """The verbatim-continuation part of the removal's own verification (ROUGE-L before / after /
    parametric), when it was verified with the model."""
    v = (state.verification or {}).get("verbatim")
    if not v:
        return None
    return {k: v.get(k) for k in ("probes", "before", "after", "parametric", "passed", "informative", "tolerance")}


# ------------------------------------------------------------------------------------------ bytes

def removed_bytes(lm: SiloLM, cfg: DatastoreConfig, content: RemovedContent,
                  max_keys: int = 16384) -> tuple[BytePatterns, np.ndarray, list[str]]:
    """What to look for: the removed documents' text and token ids, and (up to `max_keys` rows spread over
    them) their keys, encoded as the build encodes them. Returns the text and token patterns, the key rows
    (float16, [n, d]) and the document of each row."""
    patterns = BytePatterns()
    extractor = KeyExtractor(lm.model, lm.tokenizer, cfg.window, cfg.stride, cfg.batch_size)
    rows, owners = [], []
    for d, dk in zip(content.documents, extractor.iter_documents([d.text for d in content.documents])):
        patterns.text(d.id, d.text)
        patterns.tokens(d.id, encode_document(lm.tokenizer, d.text)[0])
        rows.append(dk.keys.astype(np.float16))
        owners += [d.id] * len(dk.keys)
    if not owners:
        return patterns, np.zeros((0, lm.model.get_output_embeddings().in_features), np.float16), []
    keys = np.concatenate(rows)
    take = np.unique(np.linspace(0, len(keys) - 1, min(max_keys, len(keys))).round().astype(np.int64))
    return patterns, keys[take], [owners[i] for i in take]


class _Encoder:
    """Keys as the store's index stores them (`sa_encode`, the inverted-list number stripped); `flat` when
    the index keeps the float32 keys themselves (their pattern is the key's)."""

    def __init__(self, store: Datastore):
        self.index = faiss.read_index(str(store.shards[0].dir / "index.faiss")) if store.shards else None
        self.flat = self.index is None or isinstance(faiss.downcast_index(self.index), faiss.IndexFlat)
        ivf = None if self.flat else ivf_of(self.index)
        self.skip = ivf.coarse_code_size() if ivf is not None else 0

    def __call__(self, keys32: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(keys32))[:, self.skip:]


def _live_rows(store: Datastore, encoder: _Encoder) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every live key row (float16) and of its code under the store's index (none for a flat one)."""
    keys, codes = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for s in store.shards:
        k = open_keys(s.dir, store.key_dim)
        for i in range(0, len(k), 65536):
            chunk = np.asarray(k[i:i + 65536])
            keys.append(row_hashes(chunk))
            if not encoder.flat:
                codes.append(row_hashes(encoder(chunk.astype(np.float32))))
    return np.concatenate(keys), np.concatenate(codes)


def scan_removed(lm: SiloLM, store: Path, cfg: DatastoreConfig, content: RemovedContent,
                 extra_files: list[Path] = (), max_keys: int = 16384) -> tuple[ScanReport, list[ScanReport], np.ndarray]:
    """Search every file of the store (and `extra_files`, such as the ledger) for the removed documents' text,
    token ids, keys and codes, leaving out what the live documents hold as well. Returns the store's scan,
    the extra files' scans and the keys looked for (probe queries for the model check)."""
    live = Datastore.open(store, fingerprint=lm.fingerprint)
    patterns, keys16, owners = removed_bytes(lm, cfg, content, max_keys)
    live_docs = [d for s in live.shards for d in s.live_documents()]
    patterns.drop_shared([x for d in live_docs for x in _text_forms(d.text)], ("text",))
    patterns.drop_shared([np.asarray(encode_document(lm.tokenizer, d.text)[0], dtype=t) for d in live_docs
                          for t in ("<i4", "<u2")], ("tokens",))
    keys32 = keys16.astype(np.float32)
    encoder = _Encoder(live)
    codes = None if encoder.flat else encoder(keys32)
    live_keys, live_codes = _live_rows(live, encoder)
    shared = np.isin(row_hashes(keys16), live_keys)
    if codes is not None:
        shared |= np.isin(row_hashes(codes), live_codes)
    patterns.shared["keys"] = int(shared.sum())
    for i in np.flatnonzero(~shared):
        patterns.rows("keys", owners[i], keys16[i:i + 1])
        patterns.rows("keys", owners[i], keys32[i:i + 1])
        if codes is not None:
            patterns.rows("codes", owners[i], codes[i:i + 1])
    report = scan_files(store, patterns)
    extra = [scan_files(p, patterns) for p in extra_files]
    return report, extra, keys32[~shared]


def _text_forms(text: str) -> list[bytes]:
    return [text.encode("utf-8"), json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"),
            json.dumps(text)[1:-1].encode("ascii")]


# ------------------------------------------------------------------------------------------ all of it

@dataclass
class ExactnessOptions:
    """What `verify_exactness` compares on and how much: held-out text per domain (`max_tokens` tokens each),
    never-seen documents beside the build corpus's, passages for the membership test, key rows to scan for,
    extra files to scan (a ledger), where to build the reference (kept when given)."""

    heldout: list[str]
    nonmembers: list[str] | None = None
    request_id: str | None = None
    model: str | None = None
    reference: Path | None = None
    max_tokens: int = 2000
    passages: int = 32
    passage_tokens: int = 128
    max_keys: int = 16384
    scan: list[Path] = field(default_factory=list)


def verify_exactness(store: str | Path, options: ExactnessOptions, progress: bool = True) -> dict:
    """Run the whole check on `store` for one finished removal (the latest by default) and record the report
    in its receipt; returns the report."""
    store = Path(store)
    say = (lambda m: print(f"verify-removal: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    state = _state(store, options.request_id)
    cfg = build_config(store, options.model)
    t0 = time.time()
    keep = options.reference is not None
    where = Path(options.reference) if keep else Path(tempfile.mkdtemp(prefix=f".{store.name}.reference-", dir=store.parent))
    try:
        ref_path = where if keep else where / "store"
        say(f"building the reference store without the removed content at {ref_path}")
        build_reference(store, ref_path, options.model)
        report = _checks(store, ref_path, state, cfg, options, say)
    finally:
        if not keep:
            shutil.rmtree(where, ignore_errors=True)
    report["seconds"] = round(time.time() - t0, 2)
    RemovalManager(store).record_exactness(state.request_id, report)
    say(f"{state.request_id}: {'passed' if report['passed'] else 'FAILED'} ({report['seconds']}s)")
    return report


def _checks(store: Path, ref_path: Path, state: RemovalState, cfg: DatastoreConfig, options: ExactnessOptions,
            say) -> dict:
    say("comparing files")
    files = compare_stores(store, ref_path)
    lm = SiloLM.load(cfg.model, str(store))
    ref = Datastore.open(ref_path, fingerprint=lm.fingerprint)
    content = removed_content(store, state, cfg, options.nonmembers)
    say(f"scanning every file for {len(content.documents)} removed document(s)")
    scan, extra, probe_keys = scan_removed(lm, store, cfg, content, options.scan, options.max_keys)
    say("comparing search results and served distributions")
    heldout = domain_texts(load_documents(options.heldout), options.max_tokens)
    model = model_check(lm, ref, heldout, probe_keys[:512], content.domains)
    say("membership test (Min-K%++)")
    muse = {"verbatim": verbatim_of(state),
            "privacy": privacy_leak(lm, ref, content, options.passages, options.passage_tokens),
            "utility": model.pop("utility")}
    muse["sustainability"] = sustainability(store, state.request_id, muse["utility"])
    bytes_ok = scan.passed and all(r.passed for r in extra)
    return {"request_id": state.request_id, "reference": {"path": str(ref_path), "kept": options.reference is not None,
                                                          "bound_by": read_exclusions(store).requests},
            "removed_documents": [d.id for d in content.documents], "missing_from_corpus": content.missing,
            "files": files.to_json(), "model": model, "muse": muse,
            "bytes": {"store": scan.to_json(), "extra": [r.to_json() for r in extra], "passed": bytes_ok},
            "passed": bool(files.equal and model["passed"] and bytes_ok)}

