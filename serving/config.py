"""`serve:` section of a SILO config (see configs/demo.yaml)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field, model_validator

from silo.core.config import ConfigError, StageConfig, load_section, read_yaml, validate
from silo.model.knn import KNNConfig
from silo.model.output_policy import OutputPolicy


MIN_TOKEN_CHARS = 16  # a bearer token shorter than this is guessable; refused where it is configured


def check_token(token: str, where: str, hashed_ok: bool = True) -> None:
    """A configured token: at least MIN_TOKEN_CHARS characters, or (where allowed) sha256:<64 hex digits>."""
    if hashed_ok and token.startswith("sha256:"):
        digest = token[len("sha256:"):]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"{where}: a sha256: token must be 64 hexadecimal digits")
        return
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: tokens must be at least {MIN_TOKEN_CHARS} characters (got {len(token)}); "
                         "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'")


class ServeConfig(StageConfig):
    model: str  # HF folder or hub id
    store: str | None = None  # datastore folder; None serves parametric mode only
    device: str = "auto"  # the model's: auto | cpu | cuda | cuda:N (the store's FAISS index stays on CPU)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 (or float16) on a GPU
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 = pick a free port
    knn: KNNConfig | None = None  # None: the file's top-level `knn:` section, else KNNConfig defaults
    # output controls (verbatim caps, notices, disallowed sources); None: the file's top-level
    # `output_policy:` section, else nothing capped (silo/model/output_policy.py)
    output_policy: OutputPolicy | None = None
    ledger: str | None = None  # SQLite file of the contribution ledger (serving/ledger.py); None = off
    max_queue: int = Field(16, ge=1, le=10_000)  # requests waiting for the worker; beyond: RESOURCE_EXHAUSTED
    # queue slots one client (an API token's name, else the peer's address) may hold; None: half the queue
    max_queue_per_client: int | None = Field(None, ge=1)
    # gRPC threads kept for health, admin, data owners and ModelInfo: generation calls beyond what the engine
    # can hold (max_queue + max_batch) are refused at once and never take these
    control_threads: int = Field(8, ge=2, le=256)
    max_batch: int = Field(8, ge=1, le=1024)  # generations advanced together, one token each per step
    max_tokens: int = Field(64, ge=1)  # default new tokens when a request does not say
    max_tokens_limit: int = Field(512, ge=1)  # largest max_tokens a request may ask for
    max_score_tokens: int = Field(4096, ge=1)  # longest text Score accepts, in tokens
    max_stop_sequences: int = Field(8, ge=0)
    max_prompt_chars: int = Field(32_768, ge=1)  # Complete's prompt / Chat's messages, checked before queueing
    max_messages: int = Field(64, ge=1)  # Chat messages per request
    max_logprobs: int = Field(20, ge=0, le=100)  # alternatives per token a request may ask for (logprobs)
    # HTTP completions: choices one request may ask to generate, prompts x best_of (or n); each is a job
    max_choices: int = Field(16, ge=1, le=1024)
    max_lookups: int = Field(4, ge=1)  # DataOwner.Lookup calls in flight; beyond: RESOURCE_EXHAUSTED
    admin_token: str | None = None
    admin_token_env: str | None = None  # name of an environment variable holding the admin token
    # data owners: owner -> token, or "sha256:<hex digest of the token>" so the file never holds the secret
    owner_tokens: dict[str, str] = {}
    owner_tokens_file: str | None = None  # a JSON or YAML mapping of the same form, merged over owner_tokens
    public_lookup: bool = True  # DataOwner.Lookup without a token: counts only (never text, never ids)
    # the HTTP door (serving/http): OpenAI-compatible /v1 API and the data owners' web page, served by the same
    # engine beside gRPC; None = off, 0 = a free port; http_host None = `host`
    http_port: int | None = Field(None, ge=0, le=65535)
    http_host: str | None = None
    http_max_connections: int = Field(1024, ge=16)  # open HTTP connections; beyond: 503
    # a connection must complete a request's line and headers this soon after it opens (or after its last
    # response): idle and slow-header connections are closed, not kept until the connection limit is reached
    http_header_timeout: float = Field(10.0, gt=0)
    # Host headers the HTTP door answers (DNS rebinding); None: the loopback names when it listens on a
    # loopback address, any host otherwise
    http_allowed_hosts: list[str] | None = None
    # failed token checks one peer address may make per minute before it is refused for auth_lockout_seconds
    auth_failures_per_minute: int = Field(10, ge=1)
    auth_lockout_seconds: float = Field(60.0, ge=1)
    # generation clients: name -> token (or sha256:<hex>); when any is set, generation on both doors needs a
    # bearer token (a client's, an owner's or the admin's); empty = generation open to everyone, as before
    api_tokens: dict[str, str] = {}
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics; None = off, 0 = free port
    metrics_host: str = "127.0.0.1"
    tls_cert: str | None = None  # PEM paths; both or neither
    tls_key: str | None = None
    grace_seconds: float = Field(10.0, ge=0.0)  # SIGTERM: time in-flight requests get to finish
    # poll the store's manifest this often and serve a newer generation another process published on the
    # same folder (shared storage: a removal through another server); None or 0 = off
    watch_seconds: float | None = Field(2.0, ge=0.0)
    torch_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _checks(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.admin_token is not None and self.admin_token_env is not None:
            raise ValueError("give admin_token or admin_token_env, not both")
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens ({self.max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})")
        if self.admin_token:
            check_token(self.admin_token, "admin_token", hashed_ok=False)
        for group in ("owner_tokens", "api_tokens"):
            for name, token in getattr(self, group).items():
                if token:
                    check_token(token, f"{group}.{name}")
        return self

    def resolved_admin_token(self) -> str | None:
        """The admin token, or None (admin API disabled). An empty token never enables admin."""
        if self.admin_token_env:
            token = os.environ.get(self.admin_token_env, "")
            if token:
                try:
                    check_token(token, f"the environment variable {self.admin_token_env} (serve.admin_token_env)",
                                hashed_ok=False)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            return token or None
        return self.admin_token or None

    def resolved_owner_tokens(self) -> dict[str, str]:
        """owner_tokens, with owner_tokens_file's read over them; every token checked (ConfigError naming it)."""
        tokens = {k: v for k, v in self.owner_tokens.items() if v}
        if self.owner_tokens_file:
            data = read_yaml(self.owner_tokens_file)  # YAML is a superset of JSON
            bad = [k for k, v in data.items() if not isinstance(v, str) or not v]
            if bad:
                raise ConfigError(f"{self.owner_tokens_file}: owner token(s) for {bad} must be non-empty strings")
            for name, token in data.items():
                try:
                    check_token(token, name)
                except ValueError as exc:
                    raise ConfigError(f"{self.owner_tokens_file}: {exc}") from None
            tokens.update(data)
        return tokens

    def resolved_knn(self) -> KNNConfig:
        return self.knn or KNNConfig()

    def resolved_output_policy(self) -> OutputPolicy:
        return self.output_policy or OutputPolicy()


class OwnerTokens:
    """The owners' tokens a server checks: read and checked when the server starts (a bad file stops the
    start, naming the file), read again only when owner_tokens_file changes on disk (its modification
    time), so tokens can be rotated without a restart; a changed file that no longer reads is logged and the
    tokens read before stay in force."""

    def __init__(self, cfg: "ServeConfig"):
        self.cfg = cfg
        self._stamp = self._mtime()
        self._tokens = cfg.resolved_owner_tokens()

    def _mtime(self) -> float | None:
        path = self.cfg.owner_tokens_file
        try:
            return Path(path).stat().st_mtime if path else None
        except OSError:
            return None

    def current(self) -> dict[str, str]:
        stamp = self._mtime()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._tokens = self.cfg.resolved_owner_tokens()
            except (ConfigError, OSError) as exc:
                logging.getLogger("silo.serving").error("owner tokens not reloaded, the previous ones stay: %s", exc)
        return self._tokens


def load_serve_config(path: str | Path, overrides: dict | None = None) -> ServeConfig:
    """`serve` section of `path`; without `serve.knn` / `serve.output_policy`, the file's top-level `knn` /
    `output_policy` sections supply them."""
    cfg = load_section(path, "serve", ServeConfig, overrides)
    data = read_yaml(path)
    if cfg.knn is None and isinstance(data.get("knn"), dict):
        cfg.knn = validate(KNNConfig, data["knn"], prefix="knn", source=str(path))
    if cfg.output_policy is None and isinstance(data.get("output_policy"), dict):
        cfg.output_policy = validate(OutputPolicy, data["output_policy"], prefix="output_policy", source=str(path))
    for name in ("tls_cert", "tls_key"):
        p = getattr(cfg, name)
        if p and not Path(p).is_file():
            raise ConfigError(f"{path}: serve.{name}: file not found: {p}")
    return cfg
