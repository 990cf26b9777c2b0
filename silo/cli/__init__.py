"""The `silo` command line: the top layer. Every command is a thin wrapper over a library function; each
command module registers its own commands (`register(subparsers)`) and imports its libraries lazily, so
`silo --help` stays fast."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """Typical flow (the embedded default runs all of it: silo demo --config configs/demo.yaml):
  silo corpus inspect pkg:demo/train          what is in a corpus, by domain, owner and licence tier
  silo train --config configs/demo.yaml       permissive-only LM + provenance.json
  silo datastore build --config configs/demo.yaml
  silo eval --config configs/demo.yaml        perplexity table: parametric, kNN-LM, reference
  silo generate --config configs/demo.yaml "To be, or not to be"
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    from silo.serving import cli as serving

    from . import corpus, datastore, demo, ledger, model, research, train

    p = argparse.ArgumentParser(
        prog="silo", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="SILO: an LM trained only on permissive text, with higher-risk text in a kNN datastore "
                    "that can be attributed and removed.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (corpus, train, datastore, model, demo, serving, ledger, research):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    from silo.core.config import ConfigError
    from silo.core.corpus import CorpusError
    from silo.core.models import ModelLoadError
    from silo.datastore.format import DatastoreError
    from silo.model.types import SiloInputError
    from silo.training.policy import PolicyViolation

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CorpusError, PolicyViolation, DatastoreError, ModelLoadError, SiloInputError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
