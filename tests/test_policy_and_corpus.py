"""Licence tiers, policy refusal, de-duplication, corpus validation and the shipped demo corpus."""

from __future__ import annotations

import gzip
import json

import pytest

from silo.core.corpus import CorpusError, Document, load_documents
from silo.core.licenses import POLICIES, tier_of
from silo.training.policy import PolicyViolation, apply_policy
from conftest import write_docs


def doc(i, license, text=None, owner="o"):
    return {"id": f"d{i}", "text": text or f"text number {i}", "owner": owner, "license": license}


def test_tier_table():
    assert tier_of("LicenseRef-PublicDomain") == "pd"
    assert tier_of("PSF-2.0") == "sw"
    assert tier_of("mit") == "sw"
    assert tier_of("CC-BY-2.5") == "by"
    assert tier_of("GPL-3.0-or-later") == "copyleft"
    assert tier_of("CC-BY-NC-4.0") == "nc"
    # a missing or unknown licence is never permissive
    assert tier_of("") == "unknown"
    assert tier_of(None) == "unknown"
    assert tier_of("Some-Custom-License") == "unknown"


def test_policy_refuses_and_names_documents(tmp_path):
    p = write_docs(tmp_path / "c.jsonl", [doc(1, "MIT"), doc(2, "GPL-3.0-or-later"), doc(3, "")])
    docs = load_documents(str(p))
    with pytest.raises(PolicyViolation) as err:
        apply_policy(docs, POLICIES["pdsw"])
    msg = str(err.value)
    assert "d2" in msg and "GPL-3.0-or-later" in msg and "copyleft" in msg
    assert "d3" in msg and "unknown" in msg
    assert "d1 " not in msg


def test_policy_drop_reports_counts_and_dedups(tmp_path):
    p = write_docs(tmp_path / "c.jsonl", [
        doc(1, "MIT", "same text"), doc(2, "PSF-2.0", "same text  \n"), doc(3, "CC-BY-4.0", "by text"),
        doc(4, "LicenseRef-PublicDomain", "other"),
    ])
    rep = apply_policy(load_documents(str(p)), POLICIES["pdsw"], drop_disallowed=True)
    assert [d.id for d in rep.kept] == ["d1", "d4"]
    assert [d.id for d in rep.refused] == ["d3"]
    assert rep.duplicates == [("d2", "d1")]
    assert rep.summary()["exact_duplicates_removed"] == 1
    # PDSWBY admits the CC-BY document
    rep = apply_policy(load_documents(str(p)), POLICIES["pdswby"])
    assert "d3" in [d.id for d in rep.kept]


def test_corpus_errors_name_file_line_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(doc(1, "MIT")) + "\n" + json.dumps({"id": "x", "owner": "o"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: document is missing the required field 'text'"):
        load_documents(str(p))
    p.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: not valid JSON"):
        load_documents(str(p))
    p.write_text(json.dumps(doc(1, "MIT")) + "\n" + json.dumps(doc(1, "MIT")) + "\n")
    with pytest.raises(CorpusError, match="duplicate document id 'd1'"):
        load_documents(str(p))
    with pytest.raises(CorpusError, match="corpus not found"):
        load_documents(str(tmp_path / "missing.jsonl"))


def test_gzip_and_folder_corpora(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    write_docs(folder / "a.jsonl", [doc(1, "MIT")])
    with gzip.open(folder / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(doc(2, "MIT")) + "\n")
    assert sorted(d.id for d in load_documents(str(folder))) == ["d1", "d2"]


def test_demo_corpus_is_licence_tagged_and_splits_are_disjoint():
    splits = {s: load_documents(f"pkg:demo/{s}") for s in ("train", "datastore", "val", "test")}
    ids = {s: {d.id for d in docs} for s, docs in splits.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], f"{a} and {b} share documents"
    texts = {s: {d.sha256 for d in docs} for s, docs in splits.items()}
    assert not texts["train"] & (texts["val"] | texts["test"] | texts["datastore"])
    for docs in splits.values():
        for d in docs:
            assert d.id and d.owner and d.source and d.license and d.title, d.id
    # the weights' split is permissive only; the datastore holds higher-risk text from >= 2 owners
    assert {d.tier for d in splits["train"]} <= {"pd", "sw"}
    assert {d.tier for d in splits["datastore"]} & {"by", "copyleft"}
    assert len({d.owner for d in splits["datastore"]}) >= 2
    # held-out text for the permissive and datastore domains alike
    for split in ("val", "test"):
        assert {"bible", "python", "shakespeare", "gcide"} <= {d.domain for d in splits[split]}


def test_document_json_round_trip():
    d = Document.from_json({"id": "a", "text": "t", "owner": "o", "license": "MIT", "custom": 1}, "here")
    assert d.extra == {"custom": 1}
    assert Document.from_json(d.to_json(), "again") == d
