"""Where continuous batching's gain goes: the decoder alone, then the engine, side by side in one run (not a
test: timings are noisy; ratios are what to read).

    python benchmarks/batch_bench.py --model runs/demo/model --store runs/demo/store

For each mode (parametric, kNN with the store's served gate):
  * decoder: `BatchDecoder` in this process with 1 and 8 rows (prompt "In the beginning", 32 sampled
    tokens each), tokens/s and the average step split into the retriever's datastore search, the model's
    forward and the rest (mixing, sampling, stop handling); the difference between 8 rows and 1, per
    added row, is the work batching cannot share;
  * engine: the serving `Engine` with 1 and 8 client threads (attributions asked for), which adds each
    request's own work on the worker: tokenising, the prompt's prefill and its warm-up search, attribution.
`benchmarks/load.py` measures the third level, the server behind gRPC or HTTP, with the same prompt.

Everything runs on the engine's worker thread, as in a server: the model is loaded on a thread that ends,
and the decoder measurements are a control job (a second thread running torch or FAISS would start a second
OpenMP team, and with two teams on these cores libgomp stops spinning: see `serving/server.py`).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch


def timed(fn, box: dict, name: str):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            box[name] = box.get(name, 0.0) + time.perf_counter() - t
    return run


def decoder_level(lm, retriever, rows: int, reps: int, tokens: int) -> dict:
    from silo.model.batch import BatchDecoder, Decoding
    from silo.model.sampling import SamplingParams

    ids = lm.prompt_ids("In the beginning")
    spent: dict[str, float] = {}
    if retriever is not None:
        retriever.search = timed(retriever.search, spent, "search")
    steps, made, wall = 0, 0, 0.0
    try:
        for rep in range(reps):
            dec = BatchDecoder(lm)
            searched = spent.get("search", 0.0)
            dec.add_many([Decoding(ids=list(ids), retriever=retriever,
                                   sampling=SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=rep * 100 + i))
                          for i in range(rows)])
            spent["search"] = searched  # the prompts' warm-up search is not a step's
            dec._forward = timed(dec._forward, spent, "forward")
            t = time.perf_counter()
            while dec.active:
                made += dec.active
                dec.step()
                steps += 1
            wall += time.perf_counter() - t
    finally:
        if retriever is not None:
            del retriever.search
    step = wall / steps * 1e3
    search, forward = spent.get("search", 0.0) / steps * 1e3, spent.get("forward", 0.0) / steps * 1e3
    return dict(tps=made / wall, step=step, search=search, forward=forward, rest=step - search - forward)


def engine_level(engine, mode: str, streams: int, duration: float, tokens: int) -> float:
    from silo.model.request import GenerationRequest, OutputControls, RetrievalParams
    from silo.model.sampling import SamplingParams

    made, lock, stop = [0], threading.Lock(), time.monotonic() + duration

    def loop(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            job = engine.generate(GenerationRequest(
                prompt="In the beginning", sampling=SamplingParams(max_new_tokens=tokens, seed=i * 100000 + n),
                retrieval=RetrievalParams(mode=mode), output=OutputControls(attributions=True)))
            res = job.result(timeout=120)
            with lock:
                made[0] += res.completion_tokens
            n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return made[0] / (time.monotonic() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--reps", type=int, default=6, help="batches of each size the decoder runs")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens a sequence")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per engine level")
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args(argv)

    from silo.model.lm import SiloLM
    from silo.serving.engine import Engine

    box: dict = {}

    def load() -> None:
        try:
            box["lm"] = SiloLM.load(args.model, args.store)
        except Exception as exc:  # noqa: BLE001 - reported below, on the main thread
            box["error"] = exc

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    if "lm" not in box:
        raise SystemExit(f"could not load the model {args.model} with the store {args.store}: {box.get('error')}")
    lm = box["lm"]
    engine = Engine(lm, max_queue=64, max_batch=args.max_batch)
    modes = [("parametric", None), ("knn", lm.retriever("knn"))]
    try:
        dec = {}
        for mode, retriever in modes:
            engine.control(lambda: decoder_level(lm, retriever, 2, 1, args.tokens), timeout=600)  # warm-up
            for rows in (1, args.max_batch):
                dec[(mode, rows)] = engine.control(
                    lambda: decoder_level(lm, retriever, rows, args.reps, args.tokens), timeout=600)
        eng = {}
        for mode, _ in modes:
            engine_level(engine, mode, 2, min(2.0, args.duration), args.tokens)  # warm-up
            for streams in (1, args.max_batch):
                eng[(mode, streams)] = engine_level(engine, mode, streams, args.duration, args.tokens)
    finally:
        engine.stop()

    b = args.max_batch
    print(f"{torch.get_num_threads()} torch threads; prompt 'In the beginning', {args.tokens} sampled tokens a "
          f"sequence; kNN: the store's served mixture")
    print(f"{'level':>8} {'mode':>10} {'rows':>5} {'tok/s':>8} {'step ms':>8} {'search':>7} {'forward':>8} "
          f"{'rest':>6}")
    for (mode, rows), r in dec.items():
        print(f"{'decoder':>8} {mode:>10} {rows:>5} {r['tps']:>8.1f} {r['step']:>8.2f} {r['search']:>7.2f} "
              f"{r['forward']:>8.2f} {r['rest']:>6.2f}")
    for (mode, streams), tps in eng.items():
        print(f"{'engine':>8} {mode:>10} {streams:>5} {tps:>8.1f}")
    for mode, _ in modes:
        one, many = dec[(mode, 1)], dec[(mode, b)]
        per = {k: (many[k] - one[k]) / (b - 1) for k in ("step", "search", "forward", "rest")}
        shared = one["step"] - per["step"]
        print(f"{mode}: tokens/s at {b} over 1 -- decoder {many['tps'] / one['tps']:.2f}, engine "
              f"{eng[(mode, b)] / eng[(mode, 1)]:.2f}; a step costs {shared:.2f} ms shared by the rows + "
              f"{per['step']:.2f} ms per row (search {per['search']:.2f}, forward {per['forward']:.2f}, "
              f"rest {per['rest']:.2f})")
    print(f"engine: kNN + attributions / parametric tokens/s at 1 stream: "
          f"{eng[('knn', 1)] / eng[('parametric', 1)]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
