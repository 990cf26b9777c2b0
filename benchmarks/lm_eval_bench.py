"""lm-evaluation-harness on SILO through both paths (not a test): a perplexity task per setting, in-process
(`--model silo`) and over HTTP (`local-completions` against a `silo serve` in a child process).

    .venv/bin/python -P benchmarks/lm_eval_bench.py --model runs/demo/model --store runs/demo/store \\
        --opted-out runs/demo/store-served --include-path configs/lm_eval --task silo_demo_test

Settings: parametric, the served kNN-LM (the store's gate), and the served kNN-LM on the store after an
opt-out (`--opted-out`). Paths per setting:
  in-process, sliding  SILO's protocol (BOS, sliding windows): what Score returns per document
  in-process, disjoint lm-eval's windows for API models (max_length = the model's context)
  HTTP                 local-completions, tokenized requests, max_length = the model's context
Prints, per setting and path: lm-eval's word and byte perplexity, token perplexity (from the per-document
log-likelihoods and the model's token counts), the documents' largest disagreement with the in-process
disjoint path (the same windows), the seconds lm-eval spent on the requests (its log's stamps: start-up and
loading left out), documents/s and requests/s (HTTP: one request per window). One run; the host's other work moves the times.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import ChildServer  # noqa: E402  (the server in a process of its own, as load.py runs it)


def run_lm_eval(model: str, model_args: str, task: str, include: str, out: Path) -> tuple[dict, list, float]:
    """(results, samples, wall seconds) of one lm_eval run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", model, "--model_args", model_args,
           "--include_path", include, "--tasks", task, "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lm_eval failed:\n{proc.stderr[-4000:]}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.log").write_text(proc.stderr)
    results = json.loads(Path(sorted(glob.glob(f"{out}/*/results_*.json"))[-1]).read_text())
    samples = [json.loads(line) for line in open(sorted(glob.glob(f"{out}/*/samples_{task}_*.jsonl"))[-1])]
    return results, sorted(samples, key=lambda s: s["doc_id"]), request_seconds(proc.stderr)


def request_seconds(log: str) -> float:
    """How long lm-eval spent on the model's requests: from its "Running ... requests" line to its "Saving
    results" line (its log stamps seconds; loading, task set-up and start-up are left out)."""
    stamps = {}
    for line in log.splitlines():
        for key, marker in (("start", "requests"), ("end", "Saving results")):
            if marker in line and "INFO" in line and key not in stamps and (key == "end" or "Running" in line):
                stamps[key] = datetime.strptime(line[:19], "%Y-%m-%d:%H:%M:%S")
    return max(1.0, (stamps["end"] - stamps["start"]).total_seconds())


def head_task(out: Path, max_chars: int) -> str:
    """A task over the first `max_chars` characters of each document of the demo's test split (written
    under `out`); returns its folder for --include_path."""
    from silo.core.corpus import load_documents

    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test_head.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for doc in load_documents("pkg:demo/test"):
            fh.write(json.dumps({"id": doc.id, "text": doc.text[:max_chars]}) + "\n")
    (folder / "silo_demo_test_head.yaml").write_text(
        "task: silo_demo_test_head\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return str(folder)


def summarise(results: dict, samples: list, task: str, tokenizer, context: int, wall: float) -> dict:
    """The run's figures; `wall`: seconds of its requests."""
    ll = [float(s["resps"][0][0]) for s in samples]
    texts = [s["doc"]["text"] for s in samples]
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    windows = sum(math.ceil(n / (context - 2)) for n in tokens)
    r = results["results"][task]
    secs = wall
    return {"word_ppl": r["word_perplexity,none"], "byte_ppl": r["byte_perplexity,none"],
            "token_ppl": math.exp(-sum(ll) / sum(tokens)), "ll": ll, "seconds": secs, "docs_s": len(ll) / secs,
            "windows": windows, "windows_s": windows / secs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--opted-out", help="the store after an owner's opt-out")
    ap.add_argument("--include-path", default="configs/lm_eval")
    ap.add_argument("--task", default="silo_demo_test")
    ap.add_argument("--out", default=None, help="where lm_eval writes (default: a temporary folder)")
    ap.add_argument("--max-chars", type=int, default=0,
                    help="score only the first N characters of each document of the split (a task made for the "
                         "run: silo_demo_test_head; 0 = the task as it is)")
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    context = int(AutoConfig.from_pretrained(args.model).max_position_embeddings)
    out = Path(args.out or tempfile.mkdtemp(prefix="lm-eval-bench-"))
    if args.max_chars:
        args.include_path, args.task = head_task(out, args.max_chars), "silo_demo_test_head"
    settings = [("parametric", "parametric", args.store), ("kNN-LM (served gate)", "knn", args.store)]
    if args.opted_out:
        settings.append(("kNN-LM after opt-out", "knn", args.opted_out))
    rows = []
    for name, mode, store in settings:
        base = f"model={args.model},store={store},mode={mode}"
        got = {}
        for path, model, margs in (("in-process, sliding", "silo", base + ",windows=sliding"),
                                   ("in-process, disjoint", "silo", base + ",windows=disjoint")):
            res, samples, wall = run_lm_eval(model, margs, args.task, args.include_path, out / f"{len(rows)}-{mode}-{path[12:]}")
            got[path] = summarise(res, samples, args.task, tok, context, wall)
        # local-completions sends no SILO fields: the server's default mode is the setting (no store: parametric)
        server = ChildServer({"model": args.model, "store": store if mode != "parametric" else None, "port": 0,
                              "http_port": 0, "max_queue": 64, "max_tokens_limit": 512})
        try:
            margs = (f"model={Path(args.model).name},base_url={server.url}/v1/completions,tokenizer={args.model},"
                     f"tokenizer_backend=huggingface,max_length={context}")
            res, samples, wall = run_lm_eval("local-completions", margs, args.task, args.include_path,
                                             out / f"{mode}-http-{len(rows)}")
            got["HTTP (local-completions)"] = summarise(res, samples, args.task, tok, context, wall)
        finally:
            server.stop()
        ref = got["in-process, disjoint"]["ll"]
        for path, s in got.items():
            s["max_diff"] = max(abs(a - b) for a, b in zip(s["ll"], ref))
            rows.append((name, path, s))
            print(f"{name} | {path}: token ppl {s['token_ppl']:.2f}, word ppl {s['word_ppl']:.2f}, byte ppl "
                  f"{s['byte_ppl']:.4f}, max |ll - disjoint| {s['max_diff']:.2e}, {s['seconds']:.1f} s, "
                  f"{s['docs_s']:.3f} docs/s, {s['windows']} windows", flush=True)
    print("\n| setting | path | token ppl | word ppl | byte ppl | max abs diff vs in-process disjoint (nats/doc) "
          "| request s | docs/s | HTTP requests/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path, s in rows:
        http = f"{s['windows_s']:.2f}" if path.startswith("HTTP") else "-"
        print(f"| {name} | {path} | {s['token_ppl']:.2f} | {s['word_ppl']:.2f} | {s['byte_ppl']:.4f} | "
              f"{s['max_diff']:.1e} | {s['seconds']:.1f} | {s['docs_s']:.3f} | {http} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
