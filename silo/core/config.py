"""Typed, validated configuration shared by every stage.

Each stage (corpus, train, datastore, knn, eval, serve) has one pydantic model. A YAML file holds one
section per stage; `load_section` reads one section and turns validation failures into a `ConfigError`
whose message names the file and the dotted field (``train.model.hidden_size: must be > 0``), so a
person can fix the file without reading a traceback.

Relative paths in a config are relative to the working directory the command runs in (the repository
root for the shipped configs); ``pkg:NAME`` names a file shipped inside the package (the demo corpus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and field."""


class StageConfig(BaseModel):
    """Base for every stage config: unknown keys are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


C = TypeVar("C", bound=StageConfig)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, prefix: str, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {err['msg']}{shown}")
    return f"{source}: invalid config\n" + "\n".join(lines)


def validate(cls: type[C], data: dict[str, Any], prefix: str = "", source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, source)) from None


def load_section(path: str | Path, section: str, cls: type[C], overrides: dict[str, Any] | None = None) -> C:
    """Load `section` of the YAML file at `path` as `cls`; `overrides` replace keys of the section."""
    path = Path(path)
    data = read_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: missing section '{section}' (sections present: {', '.join(data) or 'none'})")
    raw = data[section] or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping")
    raw = {**raw, **(overrides or {})}
    return validate(cls, raw, prefix=section, source=str(path))
