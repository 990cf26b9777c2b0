"""SILO: a language model whose legal risk is isolated in a nonparametric datastore.

The public API a researcher uses (imported lazily, so `import silo` stays light)::

    from silo import SiloLM, Datastore, SamplingParams, load_documents

    lm = SiloLM.load("runs/demo/model", "runs/demo/store")          # model + datastore snapshot
    knn = lm.retriever("knn", k=16, lmbda=0.5)                        # or "ric", or None (parametric)
    print(lm.score(["Now is the winter of our discontent"], knn)[0].perplexity)
    comp = lm.complete("To be, or not", SamplingParams(max_new_tokens=24, temperature=0), knn)
    print(comp.text, comp.attributions[0].sources)

Layers, bottom-up (each imports only those below it): silo.core (configs, documents, licences,
fingerprints, model loading, atomic files) -> silo.training, silo.datastore -> silo.model (SiloLM,
retrievers) -> silo.workflows, silo.research -> silo.serving -> silo.cli.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The layers training/, datastore/ and serving/ of a source checkout are sibling folders that the install
# maps under `silo.` (setuptools package-dir; an editable install maps them to the checkout). Run code
# through the installed package (`.venv/bin/silo`, `.venv/bin/pytest`), not with the checkout's root first
# on sys.path.

_EXPORTS = {
    "SiloLM": "silo.model.lm", "Generation": "silo.model.lm",
    "GenerationRequest": "silo.model.request", "RetrievalParams": "silo.model.request",
    "OutputControls": "silo.model.request",
    "KNNConfig": "silo.model.knn", "KNNRetriever": "silo.model.knn",
    "RICConfig": "silo.model.ric", "RICRetriever": "silo.model.ric",
    "SamplingParams": "silo.model.sampling",
    "OutputPolicy": "silo.model.output_policy", "VerbatimGuard": "silo.model.guard",
    "Completion": "silo.model.types", "ScoreResult": "silo.model.types", "SiloInputError": "silo.model.types",
    "TokenLogprob": "silo.model.types",
    "Datastore": "silo.datastore.store", "DatastoreConfig": "silo.datastore.build",
    "build_datastore": "silo.datastore.build",
    "RemovalManager": "silo.datastore.removal", "RemovalRequest": "silo.datastore.removal_records",
    "Document": "silo.core.corpus", "load_documents": "silo.core.corpus",
    "TrainConfig": "silo.training.train", "train": "silo.training.train",
    "EvalConfig": "silo.workflows.evaluate", "evaluate": "silo.workflows.evaluate",
    "remove_and_verify": "silo.workflows.removal",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'silo' has no attribute {name!r}")
