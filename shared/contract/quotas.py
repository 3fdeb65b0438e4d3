"""The operators' quota file (TOML): tiers, API keys and per-client overrides.

Both tiers read it: the GPU tier for limits, the frontend for API keys and its
early per-client caps. Parsing is strict: an unknown key or a bad value is an
error that names its line, so a typo never silently grants unlimited quota.
"""

from __future__ import annotations

import base64
import binascii
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypedDict, cast

ANONYMOUS = "anonymous"
CLIENT_KINDS = ("key", "session", "addr")
"""The kinds of client id operators name: ``key:NAME``, ``session:ID``, ``addr:ADDRESS``."""
KNOWN_SHOWN = 20
"""Key names listed at most in a refusal of an unknown one."""


class TierLimits(TypedDict):
    """A :class:`Tier` as JSON (:meth:`Tier.to_dict`): the ``limits`` of a client's standing."""

    weight: float
    max_running: int
    max_queued: int
    gpu_seconds: float
    window_s: float
    address_gpu_seconds: float | None
    requests_per_minute: int | None


class LimitOverrides(TypedDict, total=False):
    """The limits an override sets (those left out keep their tier's): the
    :class:`OverrideValues` that are a :class:`Tier`'s fields."""

    weight: float
    max_running: int
    max_queued: int
    gpu_seconds: float
    window_s: float
    address_gpu_seconds: float
    requests_per_minute: int


class OverrideValues(LimitOverrides, total=False):
    """What an override sets, in the quota file's ``[clients]`` or through the admin API:
    another tier, or any of a tier's limits (those left out keep their tier's)."""

    tier: str


@dataclass(frozen=True)
class Tier:
    """Limits of one tier (or one client after overrides)."""

    weight: float = 1.0
    max_running: int = 1
    max_queued: int = 4
    gpu_seconds: float = 120.0
    window_s: float = 3600.0
    address_gpu_seconds: float | None = None
    requests_per_minute: int | None = None

    def with_overrides(self, overrides: OverrideValues) -> Tier:
        """These limits with ``overrides`` (checked values, :func:`validate_overrides`) set;
        a ``tier`` among them is not a limit and is left out."""
        changes = overrides.copy()
        changes.pop("tier", None)
        limits: LimitOverrides = changes
        return replace(self, **limits)

    def to_dict(self) -> TierLimits:
        return TierLimits(
            weight=self.weight,
            max_running=self.max_running,
            max_queued=self.max_queued,
            gpu_seconds=self.gpu_seconds,
            window_s=self.window_s,
            address_gpu_seconds=self.address_gpu_seconds,
            requests_per_minute=self.requests_per_minute,
        )


TIER_FIELDS = {f.name for f in fields(Tier)}

BUILTIN_TIERS: dict[str, Tier] = {
    ANONYMOUS: Tier(
        weight=1,
        max_running=1,
        max_queued=4,
        gpu_seconds=120,
        window_s=3600,
        address_gpu_seconds=300,
        requests_per_minute=60,
    ),
    "free": Tier(weight=2, max_running=1, max_queued=8, gpu_seconds=300, window_s=3600),
    "pro": Tier(weight=4, max_running=2, max_queued=32, gpu_seconds=1800, window_s=3600),
}


WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = (24, 64)
"""A webhook secret is ``whsec_`` and the base64 of 24 to 64 random bytes (Standard Webhooks)."""


def webhook_secret_problem(secret: str) -> str | None:
    """Why ``secret`` is not a usable Standard Webhooks secret, or None."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return f"must start with {WEBHOOK_SECRET_PREFIX!r} (a Standard Webhooks secret)"
    try:
        raw = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return f"must be {WEBHOOK_SECRET_PREFIX!r} and base64"
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(raw) <= high:
        return f"must carry {low} to {high} bytes after {WEBHOOK_SECRET_PREFIX!r}, got {len(raw)}"
    return None


@dataclass(frozen=True)
class ApiKey:
    name: str
    tier: str
    sha256: str
    webhook_secret: str | None = field(default=None, repr=False)
    """The key that signs this client's webhooks (``/v1/jobs``): ``whsec_`` + base64."""

    @property
    def client_id(self) -> str:
        """The id operators see for this key's client (``key:NAME``)."""
        return f"key:{self.name}"


@dataclass(frozen=True)
class QuotaConfig:
    """A parsed quota file. ``QuotaConfig()`` is the built-in defaults."""

    tiers: dict[str, Tier] = field(default_factory=lambda: dict(BUILTIN_TIERS))
    keys: tuple[ApiKey, ...] = ()
    clients: dict[str, OverrideValues] = field(default_factory=dict)

    def tier(self, name: str) -> Tier:
        return self.tiers.get(name, self.tiers[ANONYMOUS])

    def webhook_secret(self, client_id: str) -> str | None:
        """The webhook secret of an API key's client (None: no key, or none set)."""
        return next((k.webhook_secret for k in self.keys if k.client_id == client_id), None)

    def key_tier(self, client_id: str) -> str:
        """The tier the quota file gives an API key's client; anonymous for any other id."""
        return next((k.tier for k in self.keys if k.client_id == client_id), ANONYMOUS)

    def unknown_client(self, client_id: str) -> str | None:
        """Why an operator's ``client_id`` names no client this file can have (no kind, or an
        API key the file does not list: a typo), or None. Sessions and addresses come and go,
        so any ``session:`` or ``addr:`` id may be one."""
        kind, sep, name = client_id.partition(":")
        if not sep or not name or kind not in CLIENT_KINDS:
            return f"{client_id[:80]!r} is not a client id: give key:NAME, session:ID or addr:ADDRESS"
        if kind == "key" and all(k.name != name for k in self.keys):
            names = sorted(k.client_id for k in self.keys)
            known = ", ".join(names[:KNOWN_SHOWN]) or "none"
            if len(names) > KNOWN_SHOWN:
                known += f" and {len(names) - KNOWN_SHOWN} more"
            return f"no API key named {name[:80]!r} in the quota file (its keys: {known})"
        return None

    def tier_name(self, client_id: str, tier: str, extra: OverrideValues | None = None) -> str:
        """The tier a client is in after overrides (``extra``, checked :class:`OverrideValues`,
        wins over the file)."""
        named = (extra or {}).get("tier") or self.clients.get(client_id, {}).get("tier")
        return tier if named is None else named

    def limits_for(self, client_id: str, tier: str, extra: OverrideValues | None = None) -> Tier:
        """The effective limits of one client: its tier, then file overrides, then ``extra``
        (operator overrides made through the admin API, checked :class:`OverrideValues`).
        ``extra`` may name another tier."""
        overrides: OverrideValues = {**self.clients.get(client_id, {}), **(extra or {})}
        base = self.tier(overrides.pop("tier", tier))
        return base.with_overrides(overrides)


class QuotaFileError(ValueError):
    """A quota file that cannot be used; the message names the line and the reason."""


_VALUE_TYPES: dict[str, tuple[type[int] | type[float] | type[str], ...]] = {
    "weight": (int, float),
    "max_running": (int,),
    "max_queued": (int,),
    "gpu_seconds": (int, float),
    "window_s": (int, float),
    "address_gpu_seconds": (int, float),
    "requests_per_minute": (int,),
    "tier": (str,),
}


def _line_of(text: str, section: str | None, key: str, occurrence: int = 0) -> int | None:
    """The 1-based line where ``key`` is assigned inside ``[section]`` (best effort);
    ``occurrence`` picks one table of an array of tables (``[[keys]]``), 0-based."""
    current: str | None = None
    seen = -1  # tables named ``section`` met so far, minus one
    key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if m:
            current = m.group(1).replace('"', "").replace(" ", "")
            if section is None and current.split(".")[-1] == key:
                return no
            if section is not None and current == section.replace('"', ""):
                seen += 1
            continue
        if key_re.match(line) and (section is None or (current == section.replace('"', "") and seen == occurrence)):
            return no
    return None


def _fail(text: str, section: str | None, key: str, reason: str, occurrence: int = 0) -> QuotaFileError:
    line = _line_of(text, section, key, occurrence)
    where = f"line {line}" if line else f"[{section}]" if section else "file"
    return QuotaFileError(f"{where}: {key}: {reason}")


def _check_values(text: str, section: str, values: object, allow_tier: bool) -> OverrideValues:
    if not isinstance(values, dict):
        raise _fail(text, None, section.split(".")[-1], "must be a table")
    out: dict[str, float | int | str] = {}
    for key, value in values.items():
        allowed = TIER_FIELDS | ({"tier"} if allow_tier else set())
        if key not in allowed:
            raise _fail(text, section, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        types = _VALUE_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise _fail(text, section, key, f"must be {' or '.join(t.__name__ for t in types)}")
        if not isinstance(value, str) and value < 0:  # (every key but "tier" is a number)
            raise _fail(text, section, key, "must not be negative")
        if key in ("weight", "window_s") and value == 0:
            raise _fail(text, section, key, "must be greater than 0")
        out[key] = float(value) if key in ("weight", "gpu_seconds", "window_s", "address_gpu_seconds") else value
    return cast(OverrideValues, out)  # each key allowed, each value of its key's type


def parse_quotas(text: str) -> QuotaConfig:
    """Parse quota-file text; raise QuotaFileError naming the line and reason."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise QuotaFileError(f"not valid TOML: {exc}") from None
    for top in data:
        if top not in ("tiers", "keys", "clients"):
            raise _fail(text, None, top, "unknown section (allowed: tiers, keys, clients)")
    tiers = dict(BUILTIN_TIERS)
    for name, values in data.get("tiers", {}).items():
        checked = _check_values(text, f"tiers.{name}", values, allow_tier=False)
        tiers[name] = tiers.get(name, Tier()).with_overrides(checked)
    keys: list[ApiKey] = []
    raw_keys = data.get("keys", [])
    if not isinstance(raw_keys, list):
        raise _fail(text, None, "keys", "must be an array of tables ([[keys]])")
    seen: set[str] = set()
    for n, entry in enumerate(raw_keys):
        for k in entry:
            if k not in ("name", "tier", "sha256", "webhook_secret"):
                raise _fail(text, "keys", k, "unknown key (allowed: name, tier, sha256, webhook_secret)", n)
        for k in ("name", "sha256"):
            if not isinstance(entry.get(k), str) or not entry[k]:
                raise _fail(text, "keys", k, "is required and must be text", n)
        digest = entry["sha256"].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _fail(text, "keys", "sha256", "must be 64 hex digits (sha256 of the key)", n)
        tier = entry.get("tier", "free")
        if tier not in tiers:
            raise _fail(text, "keys", "tier", f"unknown tier {tier!r}", n)
        if entry["name"] in seen:
            raise _fail(text, "keys", "name", f"duplicate key name {entry['name']!r}", n)
        seen.add(entry["name"])
        secret = entry.get("webhook_secret")
        if secret is not None:
            problem = "must be text" if not isinstance(secret, str) else webhook_secret_problem(secret)
            if problem:
                raise _fail(text, "keys", "webhook_secret", problem, n)
        keys.append(ApiKey(name=entry["name"], tier=tier, sha256=digest, webhook_secret=secret))
    clients: dict[str, OverrideValues] = {}
    for client_id, values in data.get("clients", {}).items():
        checked = _check_values(text, f"clients.{client_id}", values, allow_tier=True)
        if "tier" in checked and checked["tier"] not in tiers:
            raise _fail(text, f"clients.{client_id}", "tier", f"unknown tier {checked['tier']!r}")
        clients[client_id] = checked
    return QuotaConfig(tiers=tiers, keys=tuple(keys), clients=clients)


def validate_overrides(values: dict[str, object], config: QuotaConfig) -> OverrideValues:
    """Check operator overrides (admin API) with the quota file's rules."""
    checked = _check_values("", "override", values, allow_tier=True)
    if "tier" in checked and checked["tier"] not in config.tiers:
        raise QuotaFileError(f"tier: unknown tier {checked['tier']!r}")
    return checked


def load_quotas(path: str | Path | None) -> QuotaConfig:
    """Load the quota file at ``path``; no path means the built-in defaults."""
    if path is None:
        return QuotaConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuotaFileError(f"cannot read {p}: {exc.strerror}") from None
    return parse_quotas(text)
