"""Hugging Face Spaces bundles for both tiers, and the Hub calls that deploy them.

Why this module exists: a Space runs one folder (``README.md`` front matter,
``app.py``, ``requirements.txt``) with no access to this repository, and the
two tiers must agree on a secret that nobody else ever sees. So a bundle is
self-contained (a copy of the packages its tier needs, versions pinned to what
was tested here), and the deployment is a fixed list of Hub calls built from
the options: both Spaces created (or kept), the same fresh ``SPLITSPACE_SECRET``
set on both in the same run, variables that point the frontend at the GPU
tier, then the bundles uploaded. Running it again repeats the same calls, which
update in place (``exist_ok``, uploads overwrite), so it is idempotent.

A developer's app (``splitspace deploy APP``) goes into both bundles, under ``app/``: the
app's folder as a Space repo would hold it (modules, packages, examples and assets; no hidden
files, caches or virtual environments: :func:`_copy_app`), and its ``requirements.txt``
merged with splitspace's pins (:func:`merged_requirements`). Each bundle's ``app.py`` points
``SPLITSPACE_APP`` at the developer's file there; the file keeps its name, so an app that is
itself called ``app.py`` does not collide with the entry.

Nothing here prints a secret: a :class:`HubCall` describes itself with secret
values masked, and only descriptions are ever shown. The Hub client is passed
in (``api``), so tests drive the whole deployment with a recording stand-in.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splitspace.shared.app.loader import AppSpec

if TYPE_CHECKING:
    from huggingface_hub import HfApi

REPO = Path(__file__).resolve().parent.parent
FRONTEND, BACKEND = "frontend", "backend"

DEFAULT_MODEL = "stabilityai/sd-turbo"
ZERO_GPU = "zero-a10g"
FRONTEND_TOKEN_ENV = "SPLITSPACE_FRONTEND_HF_TOKEN"

# The subpackages of ``splitspace`` each tier imports (checked by running each bundle with the
# repo out of reach); a bundle carries them as ``splitspace/<name>/``, beside ``splitspace/__init__.py``.
# Given no app, the GPU tier loads the built-in one (``builtin/text_to_image_app.py``) whole, as
# any app, page included: so its page lives in ``builtin/``, its words in ``shared/app/``.
PACKAGES = {
    FRONTEND: ("shared", "session", "cpu_frontend", "builtin"),
    BACKEND: ("shared", "session", "gpu_backend", "builtin"),
}
# Distributions pinned in both bundles, then the GPU tier's own (torch is pinned by minor version).
COMMON_REQUIREMENTS = (
    "gradio",
    "gradio_client",
    "huggingface_hub",
    "httpx",
    "itsdangerous",
    "pydantic-settings",
    "prometheus-client",
    "redis",
    "rich",
    "typer",
    "uvicorn",
)
BACKEND_REQUIREMENTS = ("spaces", "diffusers", "transformers", "accelerate", "sortedcontainers")
FRONTEND_REQUIREMENTS = ("aiohttp",)
APP_FOLDER = "app"
"""Where a bundle keeps the developer's app."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DeployError(ValueError):
    """A deployment that cannot go ahead; raised before any Hub call."""


class HubCallFailed(RuntimeError):
    """A Hub call failed midway; the message names the call (secrets masked). Rerunning is safe."""


# -- names ---------------------------------------------------------------------------------------
def check_repo_id(repo_id: str, what: str) -> str:
    repo_id = (repo_id or "").strip()
    if not _REPO_ID.match(repo_id) or len(repo_id.split("/")[1]) > 96:
        raise DeployError(f"{what}: {repo_id!r} is not a Space id; expected OWNER/NAME")
    return repo_id


def space_url(repo_id: str) -> str:
    """The Space's direct URL: ``https://owner-name.hf.space`` (lowercase, ``/ _ .`` become ``-``)."""
    host = re.sub(r"[/_.]", "-", repo_id.lower())
    return f"https://{host}.hf.space"


# -- bundles -------------------------------------------------------------------------------------
def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_requirements(tier: str, *, app: bool = False) -> list[str]:
    """``name==version`` for every installed distribution the tier needs (torch: ``==X.Y.*``).
    A frontend that imports a developer's app needs ``spaces`` too (``@splitspace.gpu``
    wraps each function with ``spaces.GPU``, a no-op off ZeroGPU)."""
    names = COMMON_REQUIREMENTS + (BACKEND_REQUIREMENTS if tier == BACKEND else FRONTEND_REQUIREMENTS)
    if app and tier == FRONTEND:
        names += ("spaces",)
    lines = [f"{name}=={version}" for name in names if (version := _dist_version(name))]
    if tier == BACKEND:
        torch = _dist_version("torch")
        if torch:
            major, minor = torch.split("+")[0].split(".")[:2]
            lines.append(f"torch=={major}.{minor}.*")
    return lines


_REQUIREMENT_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def merged_requirements(tier: str, app: AppSpec | None) -> list[str]:
    """splitspace's pins for the tier, then the lines of the app's ``requirements.txt``
    (beside the app's file). splitspace's pin wins for a distribution both name (the
    developer's line stays, as a comment saying so), and a line for ``splitspace`` itself
    is dropped: the bundle carries it."""
    pins = pinned_requirements(tier, app=app is not None)
    if app is None:
        return pins
    source = app.path.parent / "requirements.txt"
    if not source.is_file():
        return pins
    pinned = {_dist_name(line.split("==")[0]): line for line in pins}
    lines = [*pins, f"# from {source.name} of {app.path.parent.name}/:"]
    for raw in source.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].strip()
        match = _REQUIREMENT_NAME.match(line)
        if not line or line.startswith("#"):
            continue
        name = _dist_name(match[1]) if match and not line.startswith("-") else None
        if name == "splitspace":
            lines.append(f"# {line}  (carried in this folder)")
        elif name in pinned:
            lines.append(f"# {line}  (splitspace pins {pinned[name]})")
        else:
            lines.append(line)
    return lines


def gradio_version() -> str:
    import gradio

    return gradio.__version__


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def front_matter(tier: str, app: AppSpec | None = None) -> dict[str, str | bool]:
    """The Space's configuration (README front matter), in the Spaces config reference's keys."""
    name = "splitspace" if app is None else app.path.stem
    meta: dict[str, str | bool] = {
        "title": name if tier == FRONTEND else f"{name} GPU tier",
        "emoji": "🖼️" if tier == FRONTEND else "⚙️",
        "colorFrom": "indigo" if tier == FRONTEND else "gray",
        "colorTo": "purple" if tier == FRONTEND else "indigo",
        "sdk": "gradio",
        "sdk_version": gradio_version(),
        "python_version": python_version(),
        "app_file": "app.py",
        "pinned": False,
        "short_description": (
            (
                "Text to image on a shared GPU, fair per client"
                if app is None
                else "A Gradio app on a shared GPU, fair per client"
            )
            if tier == FRONTEND
            else "GPU tier of splitspace (called by its frontend)"
        ),
    }
    if tier == BACKEND:
        meta["suggested_hardware"] = ZERO_GPU
    return meta


def _yaml_scalar(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def readme_text(
    tier: str, *, frontend: str | None = None, backend: str | None = None, app: AppSpec | None = None
) -> str:
    meta = "".join(f"{key}: {_yaml_scalar(value)}\n" for key, value in front_matter(tier, app).items())
    if app is not None:
        where = (
            f" ([{backend}](https://huggingface.co/spaces/{backend}))"
            if tier == FRONTEND and backend
            else f" ([{frontend}](https://huggingface.co/spaces/{frontend}))"
            if frontend
            else ""
        )
        body = (
            f"# {app.path.stem}\n\n"
            f"`{APP_FOLDER}/{app.path.name}`, a Gradio app served by splitspace: "
            + (
                "this Space is its public CPU tier. It serves the app and forwards each call of a "
                "`@splitspace.gpu` function, with a signed identity token, to the GPU tier"
                if tier == FRONTEND
                else "this Space is its GPU tier, which runs the app's `@splitspace.gpu` functions behind a "
                "per-client fair scheduler, called only by its frontend"
            )
            + where
            + ".\n\n"
            "Configured by Space variables and secrets (`SPLITSPACE_*`); the secret `SPLITSPACE_SECRET` "
            "is shared by both tiers.\n"
        )
    elif tier == FRONTEND:
        body = (
            "# splitspace\n\n"
            "Text to image on one shared GPU, scheduled fairly per client. This Space is the public "
            "CPU tier: the UI and the API (`/generate`, `/quota`). It validates each request, works out "
            "who is asking (session cookie, API key or address) and forwards the request, with a signed "
            "identity token and the visitor's `x-ip-token`, to the GPU tier"
            + (f" ([{backend}](https://huggingface.co/spaces/{backend}))" if backend else "")
            + ".\n\n"
            "Configured by Space variables and secrets: `SPLITSPACE_BACKEND_URL`, "
            "`SPLITSPACE_TRUSTED_PROXIES`, the secret `SPLITSPACE_SECRET` shared with the GPU tier, and "
            "`HF_TOKEN` when the GPU tier is private.\n"
        )
    else:
        body = (
            "# splitspace GPU tier\n\n"
            "The GPU half of splitspace: admission, per-client fair scheduling and the model, on "
            "ZeroGPU. Not for the public: every call must carry an identity token signed with "
            "`SPLITSPACE_SECRET`, so only its frontend"
            + (f" ([{frontend}](https://huggingface.co/spaces/{frontend}))" if frontend else "")
            + " can use it.\n\n"
            "Configured by Space variables and secrets: `SPLITSPACE_MODEL`, and the secrets "
            "`SPLITSPACE_SECRET` and `SPLITSPACE_ADMIN_TOKEN` (operators' admin API).\n"
        )
    return (
        f"---\n{meta}---\n\n{body}\nWritten by `splitspace deploy`; changes here are overwritten by the next deploy.\n"
    )


_APP_HEAD = '''\
"""splitspace {what}, as a Hugging Face Space. Written by `splitspace deploy`.

Runs the tier from the packages in this folder. Settings come from the
Space's variables and secrets (SPLITSPACE_*); the server is uvicorn on
0.0.0.0, port $PORT (7860, the port Spaces expects, when unset).
"""
'''

_APP_PATH = """
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path[:1] != [str(HERE)]:
    sys.path.insert(0, str(HERE))  # this folder's packages, never another installed copy

import uvicorn  # noqa: E402
"""

BACKEND_APP = (
    _APP_HEAD.format(what="GPU tier")
    + """
import spaces  # noqa: F401  (first, before torch: on ZeroGPU it must come before anything touches CUDA)
"""
    + _APP_PATH
    + '''
import splitspace  # noqa: E402
from splitspace.gpu_backend.app import build_app  # noqa: E402
from splitspace.shared.http.server import uvicorn_options  # noqa: E402
from splitspace.shared.config.settings import Settings  # noqa: E402


def zero_gpu_startup() -> None:
    """On ZeroGPU, what ``spaces`` runs at Gradio's ``launch()``, which a uvicorn server never calls.

    It packs the loaded model's weights for the GPU workers and reports the
    Space ready to ZeroGPU; so it runs after the model is loaded. Off ZeroGPU, nothing.
    """
    from spaces.config import Config

    if not Config.zero_gpu:
        return
    from spaces import zero

    startup = getattr(zero, "startup", None)
    if startup is None:
        raise RuntimeError("SPACES_ZERO_GPU is set but this version of spaces has no zero.startup()")
    startup()


def main() -> None:
    settings = Settings()
    app = build_app(settings)  # loads the model; the queue's max_size is set there (ZeroGPU's default is 1)
    zero_gpu_startup()
    port = int(os.environ.get("PORT") or 7860)
    print(f"splitspace GPU tier: packages from {Path(splitspace.__file__).resolve().parent.parent}, "
          f"port {port}", flush=True)
    uvicorn.run(app, host="0.0.0.0", port=port, **uvicorn_options(settings.log_level))


if __name__ == "__main__":
    main()
'''
)

FRONTEND_APP = (
    _APP_HEAD.format(what="frontend (CPU tier)")
    + _APP_PATH
    + """
import splitspace  # noqa: E402
from splitspace.cpu_frontend.app import build_app  # noqa: E402
from splitspace.shared.http.server import uvicorn_options  # noqa: E402
from splitspace.shared.config.settings import Settings  # noqa: E402


def main() -> None:
    settings = Settings()
    app = build_app(settings)
    port = int(os.environ.get("PORT") or 7860)
    print(f"splitspace frontend: packages from {Path(splitspace.__file__).resolve().parent.parent}, "
          f"port {port}", flush=True)
    uvicorn.run(app, host="0.0.0.0", port=port, **uvicorn_options(settings.log_level))


if __name__ == "__main__":
    main()
"""
)


_UVICORN_IMPORT = "import uvicorn  # noqa: E402\n"


def entry_text(tier: str, app: AppSpec | None = None) -> str:
    """The bundle's ``app.py``; with an app, it names the app's file in this folder."""
    text = BACKEND_APP if tier == BACKEND else FRONTEND_APP
    if app is None:
        return text
    line = (
        f'os.environ["SPLITSPACE_APP"] = f"{{HERE / {APP_FOLDER!r} / {app.path.name!r}}}:{app.name}"'
        "  # the developer's app\n"
    )
    return text.replace(_UVICORN_IMPORT, line + _UVICORN_IMPORT, 1)


APP_SKIPPED = {"__pycache__", "node_modules", "venv", "env", "requirements.txt", "README.md", "flagged"}
"""Never carried from an app's folder: caches, environments, and the two files the bundle writes
itself (its ``README.md``, and ``requirements.txt`` merged with splitspace's pins)."""


def _copy_app(app: AppSpec, dest: Path) -> list[Path]:
    """The app's folder as a Space repo would hold it: its modules, packages and the files they
    read (examples, assets, configs), but no hidden entry, cache, virtual environment (a folder
    with ``pyvenv.cfg``), ``*.pyc``, nor the bundles being written (a dry run's folder may be inside)."""
    bundles = dest.parent.parent.resolve()
    folder = app.path.parent
    written = []
    dest.mkdir(parents=True, exist_ok=True)

    def carried(path: Path) -> bool:
        return not (
            path.name.startswith(".")
            or path.name in APP_SKIPPED
            or path.suffix == ".pyc"
            or (path.is_dir() and (path / "pyvenv.cfg").is_file())
            or path.resolve() == bundles
            or dest.resolve().is_relative_to(path.resolve())
        )

    def walk(src: Path) -> None:
        for path in sorted(src.iterdir()):
            if not carried(path):
                continue
            if path.is_dir():
                walk(path)
            elif path.is_file():
                target = dest / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                written.append(target)

    walk(folder)
    return written


def _copy_package(src: Path, dest: Path) -> list[Path]:
    """Copy the Python files of the folder ``src`` to the folder ``dest``."""
    written = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if "__pycache__" in rel.parts:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        written.append(target)
    return written


def _fresh_dir(path: Path) -> None:
    """Empty ``path`` for a bundle; refuse to wipe a folder that is not a previous bundle."""
    if path.exists():
        if not path.is_dir():
            raise DeployError(f"{path} exists and is not a folder")
        if any(path.iterdir()) and not (path / "app.py").is_file():
            raise DeployError(f"{path} is not empty and is not a splitspace bundle; choose another folder")
        shutil.rmtree(path)
    path.mkdir(parents=True)


def build_bundle(
    tier: str, dest: Path, *, frontend: str | None = None, backend: str | None = None, app: AppSpec | None = None
) -> list[Path]:
    """Write one tier's Space folder at ``dest`` (replacing a previous bundle); returns the files.
    With ``app``, the developer's app goes in too, under ``app/``, and ``app.py`` serves it."""
    if tier not in PACKAGES:
        raise ValueError(f"tier must be {FRONTEND!r} or {BACKEND!r}, not {tier!r}")
    _fresh_dir(dest)
    files = {
        "README.md": readme_text(tier, frontend=frontend, backend=backend, app=app),
        "app.py": entry_text(tier, app),
        "requirements.txt": "\n".join(merged_requirements(tier, app)) + "\n",
    }
    written = []
    for name, text in files.items():
        (dest / name).write_text(text, encoding="utf-8")
        written.append(dest / name)
    written += _copy_package(REPO / "splitspace", dest / "splitspace")
    for package in PACKAGES[tier]:
        written += _copy_package(REPO / package, dest / "splitspace" / package)
    if app is not None:
        written += _copy_app(app, dest / APP_FOLDER)
    return written


# -- the deployment ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployOptions:
    frontend: str
    backend: str
    model: str = DEFAULT_MODEL
    private_backend: bool = True
    backend_hardware: str | None = None
    app: AppSpec | None = None
    """The developer's app; None: the built-in text-to-image (serving ``model``)."""

    def checked(self) -> DeployOptions:
        frontend = check_repo_id(self.frontend, "--frontend-space")
        backend = check_repo_id(self.backend, "--backend-space")
        if frontend.lower() == backend.lower():
            raise DeployError("--frontend-space and --backend-space must be two different Spaces")
        if not self.model.strip():
            raise DeployError("--model is empty")
        return DeployOptions(
            frontend, backend, self.model.strip(), self.private_backend, self.backend_hardware, self.app
        )


@dataclass(frozen=True)
class DeploySecrets:
    """Values that go to the Hub as Space secrets and are never shown."""

    secret: str = field(repr=False)
    admin_token: str = field(repr=False)
    frontend_token: str | None = field(default=None, repr=False)
    generated: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, environ: Mapping[str, str], frontend_token: str | None = None) -> DeploySecrets:
        generated = []
        secret = environ.get("SPLITSPACE_SECRET") or ""
        if not secret:
            secret = secrets.token_urlsafe(32)
            generated.append("SPLITSPACE_SECRET")
        admin = environ.get("SPLITSPACE_ADMIN_TOKEN") or ""
        if not admin:
            admin = secrets.token_urlsafe(32)
            generated.append("SPLITSPACE_ADMIN_TOKEN")
        token = frontend_token or environ.get(FRONTEND_TOKEN_ENV) or None
        return cls(secret, admin, token, tuple(generated))


@dataclass(frozen=True, repr=False)
class HubCall:
    """One ``HfApi`` method call; ``secret`` marks a call whose value must never be shown."""

    method: str
    args: tuple[str, ...] = ()
    kwargs: dict[str, str | bool | list[str]] = field(default_factory=dict)
    secret: bool = False

    def describe(self) -> str:
        shown = [repr(a) for a in self.args]
        if self.secret:
            shown[-1] = "***"
        shown += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.method}({', '.join(shown)})"

    __repr__ = describe  # a HubCall in a traceback or a log shows no secret either

    def apply(self, api: HfApi) -> object:
        return getattr(api, self.method)(*self.args, **self.kwargs)


def plan_calls(options: DeployOptions, folders: Mapping[str, Path], keys: DeploySecrets) -> list[HubCall]:
    """Every Hub call of a deployment, in order: both repos, then each Space's settings and files.

    Settings go before the upload so that a Space's first build already has them.
    """
    fe, be = options.frontend, options.backend

    def secret(repo: str, key: str, value: str) -> HubCall:
        return HubCall("add_space_secret", (repo, key, value), secret=True)

    def variable(repo: str, key: str, value: str) -> HubCall:
        return HubCall("add_space_variable", (repo, key, value))

    def upload(repo: str, tier: str) -> HubCall:
        return HubCall(
            "upload_folder",
            (),
            dict(
                repo_id=repo,
                repo_type="space",
                folder_path=str(folders[tier]),
                commit_message=f"splitspace deploy: {tier}",
                delete_patterns=["*.py", f"{APP_FOLDER}/**"],  # files gone from this version; new ones kept
            ),
        )

    calls = [
        HubCall(
            "create_repo",
            (be,),
            dict(repo_type="space", space_sdk="gradio", private=options.private_backend, exist_ok=True),
        ),
        HubCall("create_repo", (fe,), dict(repo_type="space", space_sdk="gradio", private=False, exist_ok=True)),
        secret(be, "SPLITSPACE_SECRET", keys.secret),
        secret(be, "SPLITSPACE_ADMIN_TOKEN", keys.admin_token),
    ]
    if options.app is None:  # an app loads its own weights
        calls.append(variable(be, "SPLITSPACE_MODEL", options.model))
    if options.backend_hardware:
        calls.append(HubCall("request_space_hardware", (be, options.backend_hardware)))
    calls += [
        upload(be, BACKEND),
        secret(fe, "SPLITSPACE_SECRET", keys.secret),
    ]
    if options.private_backend:
        if not keys.frontend_token:
            raise DeployError(_missing_token_message(be))
        calls.append(secret(fe, "HF_TOKEN", keys.frontend_token))
    calls += [
        variable(fe, "SPLITSPACE_BACKEND_URL", space_url(be)),
        variable(fe, "SPLITSPACE_TRUSTED_PROXIES", "1"),
        upload(fe, FRONTEND),
    ]
    return calls


def write_bundles(options: DeployOptions, root: Path) -> dict[str, Path]:
    folders = {FRONTEND: root / FRONTEND, BACKEND: root / BACKEND}
    for tier, folder in folders.items():
        build_bundle(tier, folder, frontend=options.frontend, backend=options.backend, app=options.app)
    return folders


def _missing_token_message(backend: str) -> str:
    return (
        f"the GPU tier {backend} is private, so the frontend needs a Hub token that can read it "
        f"(it sends it as Authorization: Bearer to {space_url(backend)}). Give --frontend-token or set "
        f"{FRONTEND_TOKEN_ENV} (a fine-grained read token is enough), or deploy with --public-backend."
    )


def deploy(
    options: DeployOptions,
    *,
    api: HfApi | None = None,
    dry_run: Path | None = None,
    frontend_token: str | None = None,
    environ: Mapping[str, str] | None = None,
    echo: Callable[[str], None] = print,
) -> list[HubCall]:
    """Build both bundles and, unless ``dry_run``, make the Hub calls; returns the calls (made or planned).

    ``api`` is an ``HfApi`` (or anything with its methods); ``None`` builds one from the
    ambient login. Raises :class:`DeployError` before any call when the options cannot work.
    """
    options = options.checked()
    keys = DeploySecrets.resolve(os.environ if environ is None else environ, frontend_token)
    missing_token = options.private_backend and not keys.frontend_token

    if dry_run is not None:
        folders = write_bundles(options, Path(dry_run))
        for tier, folder in folders.items():
            echo(f"wrote the {tier} bundle: {folder} ({_count_files(folder)} files)")
        if missing_token:
            echo(f"note: a real deploy would stop here: {_missing_token_message(options.backend)}")
            keys = DeploySecrets(keys.secret, keys.admin_token, "<token>", keys.generated)
        calls = plan_calls(options, folders, keys)
        echo("dry run: no Hub call made. A deploy would call, in order (secret values hidden):")
        for call in calls:
            echo(f"  {call.describe()}")
        _echo_summary(options, keys, echo)
        return calls

    if missing_token:
        raise DeployError(_missing_token_message(options.backend))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="splitspace-deploy-") as tmp:
        folders = write_bundles(options, Path(tmp))
        calls = plan_calls(options, folders, keys)
        for call in calls:
            echo(f"  {call.describe()}")
            try:
                call.apply(api)
            except Exception as exc:  # the Hub's errors, named by the call; never the values sent
                raise HubCallFailed(
                    f"{call.describe()} failed: {type(exc).__name__}: {exc}. Fix it and run deploy again; "
                    "the calls before it are repeated harmlessly."
                ) from None
    _echo_summary(options, keys, echo)
    return calls


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _echo_summary(options: DeployOptions, keys: DeploySecrets, echo: Callable[[str], None]) -> None:
    echo(f"frontend: https://huggingface.co/spaces/{options.frontend} ({space_url(options.frontend)})")
    serving = f"app {options.app.path.name}:{options.app.name}" if options.app else f"model {options.model}"
    echo(
        f"GPU tier: https://huggingface.co/spaces/{options.backend} ({space_url(options.backend)}), "
        f"{'private' if options.private_backend else 'public'}, {serving}"
    )
    if keys.generated:
        echo(
            f"generated (never shown; set them in the environment before deploying to choose your own): "
            f"{', '.join(keys.generated)}"
        )
    if not options.backend_hardware:
        echo(f"hardware: choose ZeroGPU ({ZERO_GPU}) in the GPU tier's settings, or pass --backend-hardware")
