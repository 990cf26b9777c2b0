"""The `research:` section of a config (plus the `eval:` section it builds on)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from silo.core.config import ConfigError, StageConfig, read_yaml, validate
from silo.workflows.evaluate import EvalConfig


class BlocksBuildConfig(StageConfig):
    build_if_missing: bool = True  # cut + index the store's blocks when a shard has none
    block_tokens: int = Field(128, gt=0)
    stride: int = Field(64, gt=0)
    retrievers: list[Literal["bm25", "dense"]] = ["bm25", "dense"]


class SweepConfig(StageConfig):
    ric_blocks: list[int] = [1, 2, 4]  # RIC-LM block counts tried on validation
    ric_ensemble: list[bool] = [False, True]  # concatenated blocks and/or REPLUG ensemble
    max_tokens: int | None = Field(None, gt=0)  # default: eval.max_tokens


class ScalingConfig(StageConfig):
    enabled: bool = True
    fractions: list[float] = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    seed: int = 0
    ric_retrievers: list[Literal["bm25", "dense"]] = []  # RIC-LM curves too (each costs a pass per fraction)


class OwnerEffectConfig(StageConfig):
    enabled: bool = True
    owners: list[str] | None = None  # default: every owner with a shard
    max_tokens: int | None = Field(None, gt=0)  # default: eval.max_tokens


class VariantSpec(StageConfig):
    name: str
    model: str


class ResearchConfig(StageConfig):
    output_dir: str = "runs/research"
    blocks: BlocksBuildConfig = BlocksBuildConfig()
    sweep: SweepConfig = SweepConfig()
    scaling: ScalingConfig = ScalingConfig()
    # perplexity of each owner's held-out text with and without them (`optout:` is accepted too)
    owner_effect: OwnerEffectConfig = Field(OwnerEffectConfig(), validation_alias=AliasChoices("owner_effect", "optout"))
    variants: list[VariantSpec] = []  # extra parametric LMs: rows of parametric-only perplexity
    train_variants: bool = False  # train missing variants first (sections of variants_config named like them)
    variants_config: str = "configs/variants.yaml"
    plots: bool = True


def load_research(path: str | Path, eval_overrides: dict | None = None,
                  overrides: dict | None = None) -> tuple[EvalConfig, ResearchConfig]:
    """The `eval` section (required) and the `research` section (optional) of a YAML file."""
    data = read_yaml(path)
    if "eval" not in data:
        raise ConfigError(f"{path}: missing section 'eval' (sections present: {', '.join(data) or 'none'})")
    ev = validate(EvalConfig, {**(data["eval"] or {}), **(eval_overrides or {})}, prefix="eval", source=str(path))
    rc = validate(ResearchConfig, {**(data.get("research") or {}), **(overrides or {})}, prefix="research",
                  source=str(path))
    if not ev.store:
        raise ConfigError(f"{path}: eval.store is required for the research harness")
    bad = [f for f in rc.scaling.fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{path}: research.scaling.fractions must lie in (0, 1] (got {bad})")
    if any(n < 1 for n in rc.sweep.ric_blocks):
        raise ConfigError(f"{path}: research.sweep.ric_blocks must be >= 1 (got {rc.sweep.ric_blocks})")
    return ev, rc
