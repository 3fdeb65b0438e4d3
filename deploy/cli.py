"""The ``splitspace`` command: run the tiers, run both for development, tune quotas.

Typer at the edge: flags become ``SPLITSPACE_*`` settings (same names), and
each subcommand hands off to the module that does the work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer

if TYPE_CHECKING:
    from splitspace.deploy.admin_client import AdminClient
    from splitspace.shared.config.settings import Settings
    from splitspace.shared.contract.admin_api import ClientStanding
    from splitspace.shared.contract.quotas import OverrideValues

app = typer.Typer(help="splitspace: serve one GPU fairly to many clients through Gradio.", no_args_is_help=True)
quota_app = typer.Typer(help="Operators: per-client quotas on a running GPU tier (admin API).", no_args_is_help=True)
app.add_typer(quota_app, name="quota")
model_app = typer.Typer(help="Operators: the GPU tier's model, changed live (admin API).", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _set_env(**values: str | None) -> None:
    for name, value in values.items():
        if value is not None:
            os.environ[f"SPLITSPACE_{name.upper()}"] = str(value)


def _checked_settings() -> Settings:
    """The settings from the environment, or a clear message and exit 2 (never a traceback:
    it would show the values, secrets among them)."""
    from pydantic import ValidationError

    from splitspace.shared.config.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "SPLITSPACE_" + ".".join(str(p) for p in error.get("loc", ())).upper()
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            typer.echo(f"error: {message if message.startswith(name) else f'{name}: {message}'}", err=True)
        raise typer.Exit(2) from None


APP_HELP = (
    "Your Gradio app: file.py (its `demo`) or file.py:NAME, its GPU functions marked @splitspace.gpu; "
    "none: the built-in text-to-image."
)


def _app_spec(app: str | None) -> str | None:
    """``APP`` checked (the file exists, the name is a name) and made absolute, as the tiers
    get it in ``SPLITSPACE_APP``; a bad one is one line and exit 2. ``None``: the one the
    environment names (checked too), if any."""
    from splitspace.shared.app.loader import AppError, AppSpec

    given = app if app is not None else os.environ.get("SPLITSPACE_APP") or None
    if given is None:
        return None
    try:
        spec = str(AppSpec.parse(given))
    except AppError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ["SPLITSPACE_APP"] = spec
    return spec


def _app_folder(spec: str | None) -> Path | None:
    return None if spec is None else Path(spec.rpartition(":")[0]).parent


@app.command()
def dev(
    app_arg: str | None = typer.Argument(None, metavar="APP", help=APP_HELP, show_default=False),
    model: str = typer.Option("tiny", help="Model spec of the built-in app: tiny, sleep:MS, or a diffusers id/path."),
    frontend_port: int = typer.Option(7860),
    backend_port: int = typer.Option(7861),
    quotas: str | None = typer.Option(None, help="Operators' quota file (TOML)."),
    reload: bool = typer.Option(False, "--reload", help="Restart a tier when its source changes."),
    backends: int = typer.Option(1, "--backends", min=1, help="GPU tiers to start (more than 1: on a local Redis)."),
    frontends: int = typer.Option(1, "--frontends", min=1, help="Frontends to start, each given every GPU tier."),
    admin_token: str | None = typer.Option(
        None,
        envvar="SPLITSPACE_ADMIN_TOKEN",
        show_envvar=True,
        show_default=False,
        help="The operators' token (admin API, `splitspace quota`, the dashboard). "
        "Default: a fresh one for this run, shown once on this terminal.",
    ),
) -> None:
    """Run both tiers on this machine (separate processes, a fresh shared secret).

    APP: your app (file.py or file.py:NAME); with --reload both tiers restart when a
    *.py file of its folder changes. With --backends or --frontends above 1, also a
    redis-server on a free port that every tier shares its limits through (Debian
    package redis-server)."""
    from splitspace.deploy.local import run_dev

    _set_env(admin_token=admin_token)
    spec = _app_spec(app_arg)
    _checked_settings()  # a bad value (a short admin token) is one line here, not a tier that dies
    env = {"SPLITSPACE_QUOTAS": quotas} if quotas else {}
    raise typer.Exit(
        run_dev(
            model=model,
            frontend_port=frontend_port,
            backend_port=backend_port,
            extra_env=env,
            reload=reload,
            backends=backends,
            frontends=frontends,
            admin_token=admin_token,
            app=spec,
        )
    )


@app.command()
def backend(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(7861),
    model: str | None = typer.Option(None, help="Model spec (default: SPLITSPACE_MODEL or tiny)."),
    app_opt: str | None = typer.Option(None, "--app", metavar="APP", help=APP_HELP),
    reload: bool = typer.Option(False, "--reload"),
) -> None:
    """The GPU tier alone."""
    _set_env(model=model)
    spec = _app_spec(app_opt)
    settings = _checked_settings()
    from splitspace.deploy.serve import serve

    serve(
        "splitspace.gpu_backend.app:create_app",
        host,
        port,
        reload=reload,
        log_level=settings.log_level,
        app_folder=_app_folder(spec),
    )


@app.command()
def frontend(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(7860),
    backend_url: str | None = typer.Option(None, help="GPU tier URL(s), comma separated."),
    app_opt: str | None = typer.Option(None, "--app", metavar="APP", help=APP_HELP),
    reload: bool = typer.Option(False, "--reload"),
) -> None:
    """The CPU tier alone."""
    _set_env(backend_url=backend_url)
    spec = _app_spec(app_opt)
    settings = _checked_settings()
    from splitspace.deploy.serve import serve

    serve(
        "splitspace.cpu_frontend.app:create_app",
        host,
        port,
        reload=reload,
        log_level=settings.log_level,
        app_folder=_app_folder(spec),
    )


@app.command("deploy")
def deploy_cmd(
    app_arg: str | None = typer.Argument(None, metavar="APP", help=APP_HELP, show_default=False),
    frontend_space: str = typer.Option(..., help="OWNER/NAME of the public frontend Space (CPU)."),
    backend_space: str = typer.Option(..., help="OWNER/NAME of the GPU tier's Space (ZeroGPU)."),
    model: str = typer.Option("stabilityai/sd-turbo", help="Model spec the GPU tier serves (SPLITSPACE_MODEL)."),
    private_backend: bool = typer.Option(
        True,
        "--private-backend/--public-backend",
        help="Make the GPU tier's Space private (the frontend then needs a token).",
    ),
    backend_hardware: str | None = typer.Option(
        None, help="Also request this hardware for the GPU tier, e.g. zero-a10g."
    ),
    dry_run: Path | None = typer.Option(
        None, "--dry-run", metavar="DIR", help="Only write DIR/frontend and DIR/backend and show the Hub calls."
    ),
    token: str | None = typer.Option(None, help="Hub token for the deployment (default: HF_TOKEN or your Hub login)."),
    frontend_token: str | None = typer.Option(
        None, help="Hub token the frontend uses to reach a private GPU tier (default: SPLITSPACE_FRONTEND_HF_TOKEN)."
    ),
) -> None:
    """Deploy both tiers to Hugging Face Spaces (the same shared secret on both; never printed).

    APP: your app (file.py or file.py:NAME); both Spaces get its folder's *.py files and
    packages, and its requirements.txt merged with splitspace's pins."""
    from splitspace.deploy.spaces import DeployError, DeployOptions, HubCallFailed, deploy
    from splitspace.shared.app.loader import AppError, AppSpec

    try:
        spec = None if app_arg is None else AppSpec.parse(app_arg)
    except AppError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    options = DeployOptions(frontend_space, backend_space, model, private_backend, backend_hardware, spec)
    api = None
    if dry_run is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        deploy(options, api=api, dry_run=dry_run, frontend_token=frontend_token, echo=typer.echo)
    except DeployError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except HubCallFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # no traceback: typer's would show local variables, secrets among them
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("hash-key")
def hash_key_cmd(key: str) -> None:
    """Print the sha256 of an API key, as the quota file stores it."""
    from splitspace.session.keys import hash_key

    typer.echo(hash_key(key))


# -- operators ------------------------------------------------------------------------------
def _admin() -> AdminClient:
    from splitspace.deploy.admin_client import AdminClient

    return AdminClient.from_env()


def _print(data: ClientStanding | list[ClientStanding], as_json: bool) -> None:
    from splitspace.deploy.admin_client import render

    typer.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else render(data))


@quota_app.command("list")
def quota_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Active clients with tier, usage, queued and running."""
    _print(_admin().list(), as_json)


@quota_app.command("show")
def quota_show(client: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One client's limits, usage and overrides."""
    _print(_admin().show(client), as_json)


@quota_app.command("set")
def quota_set(
    client: str,
    tier: str | None = typer.Option(None),
    weight: float | None = typer.Option(None),
    max_running: int | None = typer.Option(None),
    max_queued: int | None = typer.Option(None),
    gpu_seconds: float | None = typer.Option(None),
    window_s: float | None = typer.Option(None),
    address_gpu_seconds: float | None = typer.Option(None),
    requests_per_minute: int | None = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="Set it for a session or address the GPU tier has not seen."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Override a client's limits (applies to the next dispatch; survives restarts).

    CLIENT is key:NAME (an API key of the quota file), session:ID or addr:ADDRESS; a
    session or address the GPU tier does not know now is refused without --force."""
    values = {  # (typer checked each option's type: an OverrideValues)
        k: v
        for k, v in dict(
            tier=tier,
            weight=weight,
            max_running=max_running,
            max_queued=max_queued,
            gpu_seconds=gpu_seconds,
            window_s=window_s,
            address_gpu_seconds=address_gpu_seconds,
            requests_per_minute=requests_per_minute,
        ).items()
        if v is not None
    }
    if not values:
        raise typer.BadParameter("give at least one of --tier, --weight, --max-queued, ...")
    admin = _admin()
    if not force and client.startswith(("session:", "addr:")):
        from splitspace.deploy.admin_client import fail, seen

        if not seen(admin.show(client)):
            fail(
                f"the GPU tier does not know {client} (nothing queued, running or used in its window, no "
                "overrides): check the id with `splitspace quota list`, or pass --force to set it anyway"
            )
    _print(admin.set(client, cast("OverrideValues", values)), as_json)


@quota_app.command("clear")
def quota_clear(client: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Drop a client's overrides."""
    _print(_admin().clear(client), as_json)


@quota_app.command("reset")
def quota_reset(client: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Reset a client's usage in the current window."""
    _print(_admin().reset(client), as_json)


@model_app.command("show")
def model_show() -> None:
    """The model the GPU tier serves."""
    typer.echo(_admin().model()["model"])


@model_app.command("set")
def model_set(spec: str = typer.Argument(..., help="tiny, sleep:MS, or a diffusers id or path")) -> None:
    """Load another model without a restart; waits until it serves."""
    result = _admin().set_model(spec)
    typer.echo(f"model: {result['previous']} -> {result['model']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
