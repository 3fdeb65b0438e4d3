"""Settings from the environment (prefix ``SPLITSPACE_``), one class for both tiers.

pydantic-settings reads and checks them once at the edge (the CLI and the
tier apps); everything inside takes plain arguments. Secrets are SecretStr so
that they never show up in a repr, a log line or an error.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitspace.shared.contract.schema import Limits

MIN_ADMIN_TOKEN_CHARS = 16
MIN_ADMIN_TOKEN_DISTINCT = 8
"""A token of 16+ characters with fewer than 8 different ones ("aaaa...", "passwordpassword")
is refused: the guess throttle (gpu_backend/ops/operator_sessions.py) slows guessing down per
address, the token's randomness is what makes guessing hopeless."""


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLITSPACE_", extra="ignore", hide_input_in_errors=True)

    secret: SecretStr | None = None
    """One or more shared secrets, comma separated, newest first (newest signs, all verify)."""
    backend_url: str = "http://127.0.0.1:7861"
    """GPU tier URL(s), comma separated."""
    model: str = "tiny"
    app: str | None = None
    """The developer's app, ``file.py`` (its ``demo``) or ``file.py:NAME`` (``--app``); none: the built-in."""
    max_file_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    """The largest file one input or output of a developer's function may carry across the hop."""
    gpu_files_ttl_s: float = Field(default=3600.0, gt=0)
    """GPU tier: how long a file a call brought or made stays in the tier's cache after its last
    use (it serves no file to anyone: each crosses the hop as bytes). Longer than your longest call."""
    quotas: Path | None = None
    """Path of the operators' quota file (TOML)."""
    admin_token: SecretStr | None = None
    trusted_proxies: int = Field(default=0, ge=0)
    """How many reverse proxies in front of the frontend append to X-Forwarded-For (read only
    from a peer in ``trusted_proxy_cidrs``; see ``session/address.py``)."""
    trusted_proxy_cidrs: str = ""
    """Comma separated networks of the proxies whose X-Forwarded-For is believed; empty: loopback
    and the private ranges when ``trusted_proxies`` > 0, none otherwise."""
    ipv6_prefix: int = Field(default=64, ge=1, le=128)
    """Anonymous IPv6 callers are one client per network of this prefix length."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "warning"
    """Both tiers: the level of the server's log (every line capped, see ``shared/config/logs.py``)."""
    state_path: Path = Path(".splitspace/state.sqlite3")
    """GPU tier: SQLite file for usage windows and operator overrides (when ``redis_url`` is unset)."""
    redis_url: SecretStr | None = None
    """Every tier: shared state (usage, overrides, slots, rate windows, fair service) on this
    Redis, e.g. ``redis://:PASSWORD@host:6379/0``; unset, the embedded SQLite store stays.
    A SecretStr because the URL usually carries the password."""
    redis_failure: Literal["closed", "local"] = "closed"
    """While Redis is down: ``closed`` refuses with "Service unavailable" and a retry time;
    ``local`` serves from this process's memory with each limit divided by ``replicas``."""
    replicas: int = Field(default=1, ge=1)
    """How many replicas of this tier share the Redis (limits are divided by it in ``local`` mode)."""
    lease_s: float = Field(default=30.0, gt=0)
    """With Redis: how long a queued or running slot outlives a replica that stopped renewing
    it (a crash, a kill -9); each replica renews its own every third of it."""
    backend_timeout_s: float = Field(default=10.0, gt=0)
    """Frontend: bound on connecting to / hearing from the GPU tier before "GPU backend unavailable"."""
    max_threads: int = Field(default=10000, ge=1)
    """Gradio worker slots on each tier; every request in flight holds one (waiting at the
    frontend's door too: a parked coroutine), so keep it above the sum of the clients' caps."""
    door_per_flow: int = Field(default=2, ge=1)
    """Frontend: how many requests of one client (flow) may be at the GPU tier at once (its
    ``max_running``, if more); the rest wait at the frontend's fair door (``cpu_frontend/door/door.py``)."""
    door_total: int = Field(default=64, ge=1)
    """Frontend: how many requests may be at the GPU tiers at once in all: enough to keep
    them busy (raise it for many GPU tiers or large batches); the rest wait at the door,
    released in fair order, at a cost of bytes."""
    queue_max_size: int = Field(default=2000, ge=1)
    """GPU tier: Gradio queue max_size (set explicitly; ZeroGPU's default is 1)."""
    max_batch: int = Field(default=1, ge=1)
    """GPU tier: most compatible requests run in one pipeline call (capped by the model's own)."""
    batch_wait_ms: float = Field(default=0, ge=0, le=1000)
    """GPU tier: the batching window: a batch smaller than MAX_BATCH waits this long for
    compatible requests to join (0: only what already waits)."""
    idle_s: float = Field(default=600.0, ge=60)
    """Both tiers: what the tiers remember of a client (its learned in-flight cap at the
    frontend; its fair-share service at the GPU tier) is forgotten once the client has been
    idle this long (at least the 60 s rate window). Its quota usage stays in the store."""
    max_idle_clients: int = Field(default=10000, ge=1)
    """Both tiers: at most this many idle clients are remembered (the longest idle are
    forgotten first); active clients are always kept."""
    heartbeats_per_address: int = Field(default=32, ge=1)
    """Both tiers: open Gradio heartbeat streams (one per open page) per address; beyond, 429."""
    heartbeats_total: int = Field(default=2000, ge=1)
    """Both tiers: open Gradio heartbeat streams in all; beyond, 429. Also the sessions whose
    Gradio state is kept at once (``shared/gradio/gradio_sessions.py``)."""
    compile: bool = False
    """GPU tier: torch.compile the UNet (CUDA graphs on CUDA) for one size, warmed up at start."""
    compile_width: int = Field(default=512, ge=64)
    compile_height: int = Field(default=512, ge=64)
    cookie_secure: bool | None = None
    """Force the cookie's Secure attributes on/off; None decides per request (HTTPS or not)."""
    cors_origins: str = ""
    """Frontend: comma separated origins allowed to call the API from a browser (empty = same origin only)."""
    dev_reload: bool = False
    """Frontend: the page reloads itself when either tier restarts (``splitspace dev --reload``)."""
    mcp: bool = False
    """Frontend: also serve Gradio's MCP server (streamable HTTP at /gradio_api/mcp/)."""
    hf_token: SecretStr | None = Field(default=None, validation_alias="HF_TOKEN")
    """Frontend: ``HF_TOKEN`` (no prefix), the frontend Space's Hub token for a private GPU Space."""
    prompt_max_chars: int = 1000
    max_side: int = 1024
    max_steps: int = 50
    jobs_path: Path = Path(".splitspace/jobs.sqlite3")
    """Frontend: SQLite file of the durable jobs (``/v1/jobs``) when ``redis_url`` is unset."""
    job_ttl_s: float = Field(default=86400.0, gt=0)
    """Frontend: how long a finished job (its outputs, files and webhook attempts) is kept; then 404.
    Also how long an image of the OpenAI API's ``response_format="url"`` is kept after it was written."""
    webhook_allow: str = ""
    """Frontend: comma separated networks that webhook URLs may reach although they are not
    public (loopback, private, link-local); empty: public addresses only."""
    webhook_backoff_s: float = Field(default=5.0, gt=0)
    """Frontend: the first retry of a failed webhook delivery comes after this long; each next
    one after three times the last (at most an hour), ``webhook_attempts`` in all."""
    webhook_attempts: int = Field(default=12, ge=1)
    webhook_workers: int = Field(default=32, ge=1)
    """Frontend: webhook deliveries in flight at once (a hanging receiver holds one for 5 s)."""

    @field_validator("secret", "admin_token", "hf_token", "redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("admin_token", mode="after")
    @classmethod
    def _admin_token_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value().strip()
        if not token:
            raise ValueError("SPLITSPACE_ADMIN_TOKEN is blank: unset it (admin API off) or give one of 16+ characters")
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"SPLITSPACE_ADMIN_TOKEN is too short ({len(token)} characters): give at least "
                f"{MIN_ADMIN_TOKEN_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
            )
        if len(set(token)) < MIN_ADMIN_TOKEN_DISTINCT:
            raise ValueError(
                f"SPLITSPACE_ADMIN_TOKEN is too simple (fewer than {MIN_ADMIN_TOKEN_DISTINCT} different characters): "
                "give a random one (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
            )
        return SecretStr(token)

    @field_validator("trusted_proxy_cidrs", "webhook_allow", mode="after")
    @classmethod
    def _cidrs_parse(cls, value: str, info: ValidationInfo) -> str:
        for part in _split(value):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                name = f"SPLITSPACE_{str(info.field_name).upper()}"
                raise ValueError(f"{name}: not an IP network: {part[:60]!r}") from None
        return value

    @property
    def webhook_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(part, strict=False) for part in _split(self.webhook_allow)]

    @property
    def secrets(self) -> list[str]:
        return _split(self.secret.get_secret_value() if self.secret else None)

    @property
    def backend_urls(self) -> list[str]:
        return [u.rstrip("/") for u in _split(self.backend_url)]

    @property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    @property
    def limits(self) -> Limits:
        return Limits(prompt_max_chars=self.prompt_max_chars, max_side=self.max_side, max_steps=self.max_steps)
