"""The demo's path on a GPU: train, build a store, generate parametric and kNN-LM, batched (not a test).

    python benchmarks/gpu_check.py --config configs/demo.yaml --out runs/gpu_check            # cuda
    python benchmarks/gpu_check.py --config configs/demo.yaml --out /tmp/gpu_check --device cpu \\
        --max-steps 20 --max-chars 50000                                                          # a dry run

Trains the demo's permissive model (the config's `train` section, on the chosen device), builds its
datastore with the model on that device (FAISS on CPU unless faiss-gpu is installed), then prints tokens/s
of greedy generation, parametric and kNN-LM (with attributions), one request at a time and 8 requests
through the serving engine's continuous batching. Ratios are measured side by side in this one run.
`scripts/gpu_check.sh` runs it after the GPU-marked tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROMPTS = ["In the beginning God created", "The for statement in Python is used to", "What is the matter, you",
           "A dictionary is a book", "def main():\n    ", "To be, or not to be", "SICINIUS. What", "The word"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the model and the store")
    ap.add_argument("--device", default="cuda", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--max-steps", type=int, help="override train.max_steps")
    ap.add_argument("--max-chars", type=int, help="override datastore.max_chars_per_shard")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    args = ap.parse_args(argv)

    import torch

    from silo.core.models import resolve_device
    from silo.model.lm import SiloLM

    device = resolve_device(args.device)
    out = Path(args.out)
    print(f"device {device} ({torch.cuda.get_device_name(0) if device.startswith('cuda') else 'cpu'}), "
          f"torch {torch.__version__}", flush=True)
    train_and_build(args, device, out)
    lm = SiloLM.load(str(out / "model"), str(out / "store"), device=device)
    print(f"model dtype {next(lm.model.parameters()).dtype}", flush=True)
    single = one_stream(lm, args.tokens)
    batched = eight_batched(lm, args.tokens)
    print(f"{'mode':>10} {'1 stream tok/s':>15} {'8 batched tok/s':>16} {'ratio':>6}")
    for mode in ("parametric", "knn"):
        print(f"{mode:>10} {single[mode]:>15.1f} {batched[mode]:>16.1f} {batched[mode] / single[mode]:>6.2f}")
    print(f"kNN + attributions / parametric at 1 stream: {single['knn'] / single['parametric']:.2f}")
    return 0


def train_and_build(args, device: str, out: Path) -> None:
    """The demo's model (trained on `device`) and its datastore (the model encoding on `device`) under `out`."""
    from silo.core.config import load_section
    from silo.datastore.build import DatastoreConfig, build_datastore
    from silo.training.train import TrainConfig, train

    over = {"output_dir": str(out / "model")} | ({"max_steps": args.max_steps} if args.max_steps else {})
    tcfg = load_section(args.config, "train", TrainConfig, over)
    t0 = time.time()
    train(tcfg, config_source=f"{args.config}#train", progress=False)
    print(f"train: {time.time() - t0:.1f} s", flush=True)
    dover = {"model": str(out / "model"), "output_dir": str(out / "store"), "overwrite": True, "device": device}
    if args.max_chars:
        dover["max_chars_per_shard"] = args.max_chars
    dcfg = load_section(args.config, "datastore", DatastoreConfig, dover)
    t0 = time.time()
    build_datastore(dcfg, progress=False)
    print(f"datastore build (model on {device}): {time.time() - t0:.1f} s", flush=True)


def one_stream(lm, tokens: int) -> dict[str, float]:
    """Tokens/s of greedy generation one request at a time, parametric and kNN-LM (with attributions)."""
    from silo.model.sampling import SamplingParams

    knn = lm.retriever("knn", k=16, lmbda=0.25, tau=1.0)  # no gate fitted here: a fixed mixture
    sp = SamplingParams(max_new_tokens=tokens, temperature=0)
    lm.complete(PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0), knn)  # warm-up
    single = {}
    for mode, r in (("parametric", None), ("knn", knn)):
        t0, n = time.time(), 0
        for p in PROMPTS[:4]:
            n += len(lm.complete(p, sp, r, attribute=r is not None).tokens)
        single[mode] = n / (time.time() - t0)
    return single


def eight_batched(lm, tokens: int) -> dict[str, float]:
    """Tokens/s of the 8 prompts at once through the serving engine's continuous batching."""
    from silo.model.request import GenerationRequest, OutputControls, RetrievalParams
    from silo.model.sampling import SamplingParams
    from silo.serving.engine import Engine

    batched = {}
    engine = Engine(lm, max_queue=64, max_batch=8)
    try:
        for mode in ("parametric", "knn"):
            t0 = time.time()
            sp = SamplingParams(max_new_tokens=tokens, temperature=0.0)
            fixed = dict(k=16, lmbda=0.25, tau=1.0) if mode == "knn" else {}
            jobs = [engine.generate(GenerationRequest(prompt=p, sampling=sp, retrieval=RetrievalParams(mode, **fixed),
                                                      output=OutputControls(attributions=True))) for p in PROMPTS]
            n = sum(j.result(timeout=600).completion_tokens for j in jobs)
            batched[mode] = n / (time.time() - t0)
    finally:
        engine.stop()
    return batched


if __name__ == "__main__":
    sys.exit(main())
