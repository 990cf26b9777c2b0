"""Registers SILO's lm-eval model (`--model silo`, silo/workflows/harness.py) in lm-eval's model registry when
the running program is lm-eval's command line (`lm_eval`, `lm-eval`, `python -m lm_eval`).

The installed package's `silo-lm-eval.pth` imports this module at interpreter start in processes whose
command line mentions lm_eval; it registers a lazy placeholder, so SILO's model code (torch, FAISS) is
imported only when the `silo` model is asked for. Python code calling `lm_eval.simple_evaluate(model="silo")`
imports silo.workflows.harness (or calls `register()`) first.
"""

from __future__ import annotations

import os
import sys


def is_lm_eval_command() -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if sys.argv and os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval"):
        return True
    if "-m" in argv:
        return argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["lm_eval"]
    return False


def register() -> bool:
    """Register `silo` (lazily: silo.workflows.harness:SiloEvalLM) unless it is there; False without lm-eval."""
    try:
        import lm_eval.models  # noqa: F401 - lm-eval's own models first: its get_model loads them only into an empty registry
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if "silo" not in model_registry:
        model_registry.register("silo", target="silo.workflows.harness:SiloEvalLM")
    return True


if is_lm_eval_command():
    try:
        register()
    except Exception:  # noqa: BLE001 - at interpreter start: never stop lm-eval itself from running
        pass
