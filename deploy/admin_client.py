"""The client side of the admin API, for ``splitspace quota``.

Talks to the GPU tier at ``SPLITSPACE_BACKEND_URL`` (the first URL) with
``SPLITSPACE_ADMIN_TOKEN``; renders answers as rich tables. Errors become
one clear line, never a traceback, and never echo the token.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, NoReturn, cast
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

from splitspace.shared.contract.admin_api import ClientStanding, ModelChange, ModelInfo
from splitspace.shared.contract.headers import ADMIN_HEADER
from splitspace.shared.contract.quotas import OverrideValues

if TYPE_CHECKING:
    from httpx._client import UseClientDefault


def fail(message: str) -> NoReturn:
    """One clear line on stderr, exit status 1 (not a usage error: no usage text, no box)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


COLUMNS = ("client", "tier", "queued", "running", "used", "remaining", "resets_in_s", "overrides")


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {ADMIN_HEADER: token}
        hub_token = os.environ.get("HF_TOKEN")
        if hub_token:  # a private GPU Space: the Hub's proxy wants the Hub token
            headers["authorization"] = f"Bearer {hub_token}"
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    @classmethod
    def from_env(cls) -> AdminClient:
        url = (os.environ.get("SPLITSPACE_BACKEND_URL") or "http://127.0.0.1:7861").split(",")[0].strip()
        token = os.environ.get("SPLITSPACE_ADMIN_TOKEN")
        if not token:
            fail("set SPLITSPACE_ADMIN_TOKEN to the GPU tier's admin token")
        return cls(url, token)

    def _call(
        self,
        method: str,
        path: str,
        json: OverrideValues | dict[str, str] | None = None,
        timeout: float | None | UseClientDefault = httpx.USE_CLIENT_DEFAULT,
    ) -> object:
        """The decoded JSON of the API's answer (its shape: ``shared/contract/admin_api.py``)."""
        try:
            r = self._http.request(method, f"{self.base_url}/admin{path}", json=json, timeout=timeout)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the GPU tier at {self.base_url}: {type(exc).__name__}")
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            fail(f"HTTP {r.status_code}: {detail}")
        return r.json()

    def list(self) -> list[ClientStanding]:
        return cast(list[ClientStanding], self._call("GET", "/clients"))

    def show(self, client: str) -> ClientStanding:
        return cast(ClientStanding, self._call("GET", f"/clients/{quote(client, safe=':')}"))

    def set(self, client: str, values: OverrideValues) -> ClientStanding:
        return cast(ClientStanding, self._call("PUT", f"/clients/{quote(client, safe=':')}", json=values))

    def clear(self, client: str) -> ClientStanding:
        return cast(ClientStanding, self._call("DELETE", f"/clients/{quote(client, safe=':')}"))

    def model(self) -> ModelInfo:
        return cast(ModelInfo, self._call("GET", "/model"))

    def set_model(self, spec: str) -> ModelChange:
        return cast(ModelChange, self._call("PUT", "/model", json={"model": spec}, timeout=None))

    def reset(self, client: str) -> ClientStanding:
        return cast(ClientStanding, self._call("POST", f"/reset/{quote(client, safe=':')}"))


def seen(standing: ClientStanding) -> bool:
    """Whether the GPU tier knows a client now, from its ``show`` answer: something queued,
    running or used in its window (for an address, by its sessions too), or overrides."""
    address = standing.get("address")
    address_used = address.get("used") if isinstance(address, dict) else None
    return bool(
        standing.get("queued")
        or standing.get("running")
        or standing.get("overrides")
        or (standing.get("used") or 0) > 0
        or (address_used or 0) > 0
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def render(data: ClientStanding | list[ClientStanding]) -> str:
    rows = data if isinstance(data, list) else [data]
    table = Table(*COLUMNS)
    for row in rows:
        table.add_row(*(_cell(cast(dict[str, object], row).get(c)) for c in COLUMNS))
    out = io.StringIO()
    Console(file=out, width=160).print(table)
    if not isinstance(data, list) and data.get("limits"):
        out.write("limits: " + _cell(data["limits"]) + "\n")
    return out.getvalue()
