"""More than one server over one store folder: a removal reaches every server that serves it.

Plain `silo serve` processes over shared storage pick a newer generation up by themselves (serve.watch_seconds);
replicas on a Ray cluster (`silo serve --ray`) are switched by the store controller before a removal is
called applied (tests further below, with a real local Ray cluster)."""

from __future__ import annotations

import shutil
import time

from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

ADMIN = "admin-token"
OWNER = "shksprdata"


def plain_server(model, store, **over) -> SiloServer:
    cfg = ServeConfig(model=str(model), store=str(store), port=0, admin_token=ADMIN, **over)
    return SiloServer(cfg, lm=SiloLM.load(str(model), str(store))).start()


def owner_sources(client, prompt: str) -> set[str]:
    r = client.complete(prompt, max_tokens=16, temperature=0, lmbda=0.9, return_attributions=True)
    return {s.owner for a in r.attributions for s in a.sources}, r.store_generation


def test_plain_servers_over_one_folder_pick_up_each_others_removals(tiny_model, tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    watch = 0.5
    a, b = plain_server(tiny_model, store, watch_seconds=watch), plain_server(tiny_model, store, watch_seconds=watch)
    try:
        doc = b.engine.lm.store.shards[[sh.name for sh in b.engine.lm.store.shards].index(OWNER)].documents[0]
        prompt = doc["text"][:120]
        with SiloClient(a.target, token=ADMIN, timeout=300) as ca, SiloClient(b.target, token=ADMIN, timeout=300) as cb:
            owners, generation = owner_sources(cb, prompt)
            assert OWNER in owners and generation == 1
            status = ca.submit_removal(owner=OWNER, requester=OWNER, reason="opt-out")
            assert status.status == "applied" and status.generation == 2
            # B serves the new generation within the documented bound (a poll, plus opening the changed
            # shards), without anyone calling ReloadDatastore on it
            t0 = time.monotonic()
            while b.engine.lm.store.generation < 2:
                assert time.monotonic() - t0 < 60, "B never picked up the removal"
                time.sleep(0.05)
            owners, generation = owner_sources(cb, prompt)
            assert OWNER not in owners and generation >= 2
            assert OWNER not in {sh.name for sh in cb.info().store.shards}
    finally:
        a.dataowner.wait_background(300)
        a.stop()
        b.stop()
