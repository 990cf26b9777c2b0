"""silo.v1.DataOwner on a real server: authorisation, live removal, status lifecycle, receipts, lookup."""

from __future__ import annotations

import hashlib
import json
import shutil

import grpc
import pytest

from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

ADMIN = "admin-token-0123456789abcdef"
GCIDE_TOKEN = "gcide-secret-0123456789abcdef"
SHKSPR_TOKEN = "shakespeare-secret"


@pytest.fixture()
def served(tiny_model, tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # removals mutate the store: never the shared fixture
    cfg = ServeConfig(model=str(tiny_model), store=str(store), port=0, admin_token=ADMIN,
                      owner_tokens={"gcide": "sha256:" + hashlib.sha256(GCIDE_TOKEN.encode()).hexdigest(),
                                    "shksprdata": SHKSPR_TOKEN})
    lm = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    server = SiloServer(cfg, lm=lm).start()
    yield server, store
    server.dataowner.wait_background(120)
    server.stop()


def code_of(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_owner_tokens_only_reach_their_own_content(served):
    server, store = served
    with SiloClient(server.target) as anon:
        code, msg = code_of(lambda: anon.submit_removal(owner="gcide", requester="x", reason="y"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with SiloClient(server.target, token="not-a-token") as bad:
        assert code_of(lambda: bad.submit_removal(owner="gcide", requester="x", reason="y"))[0] == \
            grpc.StatusCode.PERMISSION_DENIED
    with SiloClient(server.target, token=GCIDE_TOKEN) as gcide:
        code, msg = code_of(lambda: gcide.submit_removal(owner="shksprdata", requester="gcide", reason="not mine"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "shksprdata" in msg
        doc = json.loads((store / "shards" / "shksprdata" / "documents.jsonl").read_text().splitlines()[0])["id"]
        code, msg = code_of(lambda: gcide.submit_removal(document_ids=[doc], requester="gcide", reason="r"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, msg = code_of(lambda: gcide.submit_removal(owner="gcide", requester="", reason="r"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "requester" in msg
        code, msg = code_of(lambda: gcide.submit_removal(requester="a", reason="r"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    # nothing changed
    assert json.loads((store / "manifest.json").read_text())["generation"] == 1
    assert not (store / "removals").exists() or not list((store / "removals").iterdir())


def test_owner_removal_is_live_verified_and_receipted(served):
    server, store = served
    gdoc = json.loads((store / "shards" / "gcide" / "documents.jsonl").read_text().splitlines()[0])
    prompt = gdoc["text"][: gdoc["text"].find("\n", 60) + 1]  # the opening of a stored gcide document
    with SiloClient(server.target, timeout=120) as c:  # Lookup needs no token (public_lookup): counts only
        look = c.lookup(text=gdoc["text"][200:400])
        assert look.in_store and look.matched_sentences > 0 and look.entries > 0
        assert not look.matches and not look.shards  # the public learns whether, not where or whose
    with SiloClient(server.target, token=GCIDE_TOKEN, timeout=120) as c:  # the owner sees its own documents
        mine = c.lookup(text=gdoc["text"][200:400])
        assert mine.shards == ["gcide"] and gdoc["id"] in {m.document_id for m in mine.matches}
        r0 = c.complete(prompt, max_tokens=24, temperature=0, return_attributions=True, lmbda=0.8)
        assert any(s.owner == "gcide" for a in r0.attributions for s in a.sources)
    with SiloClient(server.target, token=GCIDE_TOKEN, timeout=300) as owner:
        status = owner.submit_removal(owner="gcide", requester="GCIDE maintainers", reason="opt-out")
        assert status.status == "applied" and status.kind == "owner" and status.entries > 0
        # live at once: every generation after this never cites gcide
        for seed in range(3):
            r = owner.complete(prompt, max_tokens=24, temperature=0.8, seed=seed, return_attributions=True,
                               lmbda=0.8)
            assert all(s.owner != "gcide" for a in r.attributions for s in a.sources)
            assert r.store_generation >= 2
        server.dataowner.wait_background(300)
        final = owner.get_removal(status.request_id)
        assert final.status == "verified", final.error
        assert final.HasField("verification_passed") and final.verification_passed
        receipt = owner.get_receipt(status.request_id)
        assert receipt.removed.entries == status.entries
        assert receipt.verification["probe"]["after"]["hits"] == 0
        assert receipt.verification["probe"]["before"]["hits"] > 0
        assert [x.present for x in receipt.shards_after] == [False]
        assert [x.request_id for x in owner.list_removals()] == [status.request_id]
        assert not owner.lookup(document_id=gdoc["id"]).in_store
    # the other owner sees none of gcide's requests
    with SiloClient(server.target, token=SHKSPR_TOKEN) as other:
        assert other.list_removals() == []
        assert code_of(lambda: other.get_removal(status.request_id))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert not (store / "shards" / "gcide").exists()


def test_document_removal_by_admin_with_wait(served):
    server, store = served
    doc = json.loads((store / "shards" / "shksprdata" / "documents.jsonl").read_text().splitlines()[1])
    with SiloClient(server.target, token=ADMIN, timeout=300) as admin:
        assert admin.lookup(document_id=doc["id"]).in_store
        st = admin.submit_removal(document_ids=[doc["id"]], requester="ops", reason="court order", wait=True,
                                  skip_verification=True)
        assert st.status == "compacted" and not st.HasField("verification_passed")
        assert not admin.lookup(document_id=doc["id"]).in_store
        assert admin.get_receipt(st.request_id).removed.documents[0].document_ids == (doc["id"],)
        code, msg = code_of(lambda: admin.get_removal("rm-unknown"))
        assert code == grpc.StatusCode.NOT_FOUND
    needle = doc["text"][500:560].encode()
    for f in store.rglob("*"):
        if f.is_file() and f.suffix in (".jsonl", ".npy", ".faiss", ".json"):
            assert needle not in f.read_bytes(), f
