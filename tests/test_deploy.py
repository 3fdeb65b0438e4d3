"""``splitspace deploy``: the Space bundles (written and run for real) and the Hub calls.

The Hub is not reachable from CI, so the live path is covered in two halves:
each bundle is started as its own process from its own folder, with this
repository out of reach, and served through; and the deployment's Hub calls
are made against a recording stand-in for ``HfApi``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio
import httpx
import pytest
from gradio_client import Client
from PIL import Image
from typer.testing import CliRunner

from splitspace.deploy.cli import app as cli_app
from splitspace.deploy.spaces import (
    BACKEND,
    FRONTEND,
    DeployError,
    DeployOptions,
    deploy,
    space_url,
)
from splitspace.shared.app.loader import AppSpec
from tests.support import REPO, TierProcess, free_port, wait_ready

FE, BE = "alice/splitspace", "alice/Splitspace_GPU.v2"
REQUIRED_KEYS = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "python_version", "pinned"}


def front_matter(readme: Path) -> dict[str, Any]:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    block = text.split("---\n", 2)[1]
    try:
        import yaml
    except ImportError:  # pragma: no cover
        import json

        return {k: json.loads(v) for k, v in (line.split(": ", 1) for line in block.splitlines())}
    return yaml.safe_load(block)


def all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


# -- 1. dry run ----------------------------------------------------------------------------------
def test_dry_run_writes_both_bundles(tmp_path, monkeypatch):
    secret, admin, fe_token = "s3cret-value-0123456789", "admin-value-0123456789", "hf_frontendtoken0123"
    monkeypatch.setenv("SPLITSPACE_SECRET", secret)
    monkeypatch.setenv("SPLITSPACE_ADMIN_TOKEN", admin)
    result = CliRunner().invoke(
        cli_app,
        [
            "deploy",
            "--frontend-space",
            FE,
            "--backend-space",
            BE,
            "--model",
            "tiny",
            "--frontend-token",
            fe_token,
            "--dry-run",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for tier, package in ((FRONTEND, "cpu_frontend"), (BACKEND, "gpu_backend")):
        bundle = out / tier
        meta = front_matter(bundle / "README.md")
        assert REQUIRED_KEYS <= set(meta)
        assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["pinned"] is False
        assert meta["sdk_version"] == gradio.__version__
        assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
        assert isinstance(meta["python_version"], str)
        assert (bundle / "splitspace" / "__init__.py").is_file()  # one import package, as installed
        for pkg in ("shared", "session", package):
            assert (bundle / "splitspace" / pkg / "__init__.py").is_file()
            assert not (bundle / pkg).exists()
        assert not list(bundle.rglob("__pycache__"))
        reqs = [line for line in (bundle / "requirements.txt").read_text().splitlines() if line.strip()]
        assert reqs and all("==" in line for line in reqs)
        names = {line.split("==")[0] for line in reqs}
        assert {"gradio", "gradio_client", "httpx", "itsdangerous", "pydantic-settings"} <= names
        assert f"gradio=={gradio.__version__}" in reqs
    assert front_matter(out / BACKEND / "README.md")["suggested_hardware"] == "zero-a10g"
    assert "suggested_hardware" not in front_matter(out / FRONTEND / "README.md")
    assert not (out / FRONTEND / "splitspace" / "gpu_backend").exists()
    assert not (out / BACKEND / "splitspace" / "cpu_frontend").exists()
    backend_reqs = (out / BACKEND / "requirements.txt").read_text()
    frontend_reqs = (out / FRONTEND / "requirements.txt").read_text()
    assert "spaces==" in backend_reqs and "torch==" in backend_reqs
    for heavy in ("torch", "diffusers", "transformers", "spaces"):
        assert not any(line.startswith(heavy + "==") for line in frontend_reqs.splitlines())
    # spaces first in the backend's entry, before anything that could import torch
    code = [
        line for line in (out / BACKEND / "app.py").read_text().splitlines() if line.startswith(("import ", "from "))
    ]
    assert code[0].startswith("import spaces")
    # never a secret: not in the files, not in what was printed
    for value in (secret, admin, fe_token):
        assert value not in all_text(out)
        assert value not in result.output
    assert "add_space_secret" in result.output and space_url(BE) in result.output


def test_dry_run_replaces_a_previous_bundle_but_not_other_folders(tmp_path):
    options = DeployOptions(FE, BE, "tiny", private_backend=False)
    deploy(options, dry_run=tmp_path, environ={}, echo=lambda _: None)
    stale = tmp_path / FRONTEND / "splitspace" / "shared" / "stale.py"
    stale.write_text("x = 1\n")
    deploy(options, dry_run=tmp_path, environ={}, echo=lambda _: None)
    assert not stale.exists()
    other = tmp_path / "other"
    (other / FRONTEND).mkdir(parents=True)
    (other / FRONTEND / "notes.txt").write_text("mine")
    with pytest.raises(DeployError, match="not a splitspace bundle"):
        deploy(options, dry_run=other, environ={}, echo=lambda _: None)
    assert (other / FRONTEND / "notes.txt").read_text() == "mine"


def test_space_url():
    assert space_url("alice/splitspace") == "https://alice-splitspace.hf.space"
    assert space_url("Alice_B/My.Space_GPU") == "https://alice-b-my-space-gpu.hf.space"


# -- 2. the bundles, run for real ----------------------------------------------------------------
# Runs a bundle's app.py as Spaces would (``python app.py`` in its folder), with this
# repository out of reach: the editable install's finder is dropped and the import of
# ``splitspace`` must fail (until app.py puts its own folder first), so every splitspace
# module comes from the bundle.
ISOLATE = textwrap.dedent("""\
    import importlib.util, runpy, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p and not p.startswith({repo!r})]
    for name in ("splitspace", "tests"):
        assert importlib.util.find_spec(name) is None, name + " is importable: the repo is in reach"
    sys.argv = ["app.py"]
    runpy.run_path("app.py", run_name="__main__")
""")


def bundle_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPLITSPACE_", "PYTHON", "SPACES_"))}
    env.pop("HF_TOKEN", None)
    return {**env, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **extra}


def start_bundle(bundle: Path, name: str, env: dict[str, str], log_path: Path, timeout_s: float = 120) -> TierProcess:
    isolate = bundle.parent / "isolate.py"
    isolate.write_text(ISOLATE.format(repo=str(REPO)))
    port = int(env["PORT"])
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, str(isolate)], cwd=bundle, env=bundle_env(env), stdout=log, stderr=subprocess.STDOUT
    )
    return wait_ready(TierProcess(name, f"http://127.0.0.1:{port}", proc, log_path), timeout_s)


BUNDLE_SECRET = "bundle-test-secret-0123456789abcdef"


@contextlib.contextmanager
def serving_bundles(out: Path, logs: Path, backend_env: dict[str, str]) -> Iterator[tuple[TierProcess, TierProcess]]:
    """Both bundles in ``out`` started from their own folders, the frontend pointed at the GPU
    tier, sharing ``BUNDLE_SECRET`` (which neither may log); stopped on leaving."""
    be_port, fe_port = free_port(), free_port()
    tiers: list[TierProcess] = []
    try:
        env = {"PORT": str(be_port), "SPLITSPACE_SECRET": BUNDLE_SECRET, **backend_env}
        tiers.append(start_bundle(out / BACKEND, "backend", env, logs / "backend.log"))
        env = {"PORT": str(fe_port), "SPLITSPACE_SECRET": BUNDLE_SECRET, "SPLITSPACE_BACKEND_URL": tiers[0].url}
        tiers.append(start_bundle(out / FRONTEND, "frontend", env, logs / "frontend.log"))
        backend, frontend = tiers
        # each tier says where its packages came from: the bundle, not this repository
        assert f"packages from {(out / BACKEND).resolve()}," in backend.log()
        assert f"packages from {(out / FRONTEND).resolve()}," in frontend.log()
        yield backend, frontend
        assert BUNDLE_SECRET not in backend.log() + frontend.log()
    finally:
        for tier in reversed(tiers):
            tier.stop()


def test_bundles_serve_a_generate_call_on_their_own(tmp_path):
    out = tmp_path / "bundles"
    deploy(DeployOptions(FE, BE, "tiny", private_backend=False), dry_run=out, environ={}, echo=lambda _: None)
    backend_env = {"SPLITSPACE_MODEL": "tiny", "SPLITSPACE_STATE_PATH": str(tmp_path / "state.sqlite3")}
    with serving_bundles(out, tmp_path, backend_env) as (backend, frontend):
        assert httpx.get(f"{backend.url}/health").json()["model"] == "tiny"
        client = Client(frontend.url, verbose=False)
        path, info = client.predict("a cat", "", 64, 64, 1, 0.0, 1, api_name="/generate")
        assert Image.open(path).size == (64, 64)
        assert info["model"] == "tiny" and info["width"] == 64


def test_backend_bundle_runs_zero_gpu_startup_only_on_zero_gpu(tmp_path):
    """uvicorn never calls Blocks.launch(), where spaces does its ZeroGPU startup: app.py calls it."""
    deploy(DeployOptions(FE, BE, "tiny", private_backend=False), dry_run=tmp_path, environ={}, echo=lambda _: None)
    probe = textwrap.dedent("""\
        import runpy, spaces, spaces.config, spaces.zero
        calls = []
        spaces.zero.startup = lambda: calls.append("startup")
        ns = runpy.run_path("app.py")          # not __main__: defines, does not serve
        ns["zero_gpu_startup"]()
        assert calls == [], calls              # off ZeroGPU: nothing
        spaces.config.Config.zero_gpu = True
        ns["zero_gpu_startup"]()
        assert calls == ["startup"], calls
        print("ok")
    """)
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path / BACKEND,
        env=bundle_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


# -- 3. the Hub calls, against a recording stand-in ----------------------------------------------
class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records every method call, returns None."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record


def expected_calls(secret: str, admin: str, fe_token: str | None, model: str, private: bool):
    def upload(repo: str) -> tuple[str, tuple, dict]:
        return ("upload_folder", (), {"repo_id": repo, "repo_type": "space"})

    calls = [
        ("create_repo", (BE,), dict(repo_type="space", space_sdk="gradio", private=private, exist_ok=True)),
        ("create_repo", (FE,), dict(repo_type="space", space_sdk="gradio", private=False, exist_ok=True)),
        ("add_space_secret", (BE, "SPLITSPACE_SECRET", secret), {}),
        ("add_space_secret", (BE, "SPLITSPACE_ADMIN_TOKEN", admin), {}),
        ("add_space_variable", (BE, "SPLITSPACE_MODEL", model), {}),
        upload(BE),
        ("add_space_secret", (FE, "SPLITSPACE_SECRET", secret), {}),
    ]
    if private:
        calls.append(("add_space_secret", (FE, "HF_TOKEN", fe_token), {}))
    calls += [
        ("add_space_variable", (FE, "SPLITSPACE_BACKEND_URL", "https://alice-splitspace-gpu-v2.hf.space"), {}),
        ("add_space_variable", (FE, "SPLITSPACE_TRUSTED_PROXIES", "1"), {}),
        upload(FE),
    ]
    return calls


def comparable(calls, uploaded: dict[str, set[str]]):
    """Recorded calls, each upload's temporary folder and message dropped (checked separately)."""
    out = []
    for name, args, kwargs in calls:
        if name == "upload_folder":
            assert kwargs.pop("delete_patterns") == ["*.py", "app/**"]
            kwargs.pop("commit_message")
            assert Path(kwargs.pop("folder_path")).name in (FRONTEND, BACKEND)
            assert kwargs["repo_id"] in uploaded
        out.append((name, args, kwargs))
    return out


class UploadCheckingApi(RecordingApi):
    """Also looks inside each folder at upload time (it is a temporary folder, gone afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.uploaded: dict[str, set[str]] = {}
        self.uploaded_text = ""

    def upload_folder(self, **kwargs: Any) -> None:
        folder = Path(kwargs["folder_path"])
        self.uploaded[kwargs["repo_id"]] = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        self.uploaded_text += all_text(folder)
        self.calls.append(("upload_folder", (), dict(kwargs)))


def test_deploy_makes_the_hub_calls_and_prints_no_secret(capsys):
    fe_token = "hf_frontend_read_token_0123"
    for _run in range(2):  # the second run repeats the same calls: idempotent on the Hub's side
        api = UploadCheckingApi()
        deploy(DeployOptions(FE, BE, model="stabilityai/sd-turbo"), api=api, environ={}, frontend_token=fe_token)
        secret_calls = [c for c in api.calls if c[0] == "add_space_secret" and c[1][1] == "SPLITSPACE_SECRET"]
        assert [c[1][0] for c in secret_calls] == [BE, FE]
        secret = secret_calls[0][1][2]
        assert secret_calls[1][1][2] == secret and len(secret) >= 40  # token_urlsafe(32)
        admin = next(c[1][2] for c in api.calls if c[1][1:2] == ("SPLITSPACE_ADMIN_TOKEN",))
        assert admin != secret and len(admin) >= 40
        assert comparable(api.calls, api.uploaded) == expected_calls(
            secret, admin, fe_token, "stabilityai/sd-turbo", private=True
        )
        assert "app.py" in api.uploaded[BE] and "splitspace/gpu_backend/app.py" in api.uploaded[BE]
        assert "app.py" in api.uploaded[FE] and "splitspace/cpu_frontend/app.py" in api.uploaded[FE]
        printed = capsys.readouterr()
        for value in (secret, admin, fe_token):
            assert value not in printed.out + printed.err
            assert value not in api.uploaded_text
        assert "add_space_secret" in printed.out


def test_secrets_from_the_environment_and_a_public_backend(capsys):
    api = UploadCheckingApi()
    env = {"SPLITSPACE_SECRET": "env-secret-abcdefghijklmnop", "SPLITSPACE_ADMIN_TOKEN": "env-admin-abcdefghij"}
    deploy(DeployOptions(FE, BE, model="tiny", private_backend=False), api=api, environ=env)
    assert comparable(api.calls, api.uploaded) == expected_calls(
        env["SPLITSPACE_SECRET"], env["SPLITSPACE_ADMIN_TOKEN"], None, "tiny", private=False
    )
    printed = capsys.readouterr().out
    assert env["SPLITSPACE_SECRET"] not in printed and env["SPLITSPACE_ADMIN_TOKEN"] not in printed


def test_frontend_token_from_the_environment():
    api = UploadCheckingApi()
    deploy(
        DeployOptions(FE, BE),
        api=api,
        environ={"SPLITSPACE_FRONTEND_HF_TOKEN": "hf_env_token_xyz"},
        echo=lambda _: None,
    )
    assert ("add_space_secret", (FE, "HF_TOKEN", "hf_env_token_xyz"), {}) in api.calls


def test_private_backend_without_a_frontend_token_fails_before_any_call():
    api = RecordingApi()
    with pytest.raises(DeployError, match="--frontend-token"):
        deploy(DeployOptions(FE, BE), api=api, environ={}, echo=lambda _: None)
    assert api.calls == []


def test_cli_reports_a_missing_frontend_token_as_an_error(monkeypatch):
    monkeypatch.delenv("SPLITSPACE_FRONTEND_HF_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["deploy", "--frontend-space", FE, "--backend-space", BE])
    assert result.exit_code == 2
    assert "--frontend-token" in result.output


@pytest.mark.parametrize("fe,be", [("alice", BE), (FE, "a/b/c"), (FE, FE), (FE, "alice/SPLITSPACE")])
def test_bad_space_ids_fail_before_any_call(fe, be):
    api = RecordingApi()
    with pytest.raises(DeployError):
        deploy(DeployOptions(fe, be, private_backend=False), api=api, environ={}, echo=lambda _: None)
    assert api.calls == []


def test_backend_hardware_is_requested_when_asked():
    api = UploadCheckingApi()
    deploy(
        DeployOptions(FE, BE, private_backend=False, backend_hardware="zero-a10g"),
        api=api,
        environ={},
        echo=lambda _: None,
    )
    names = [c[0] for c in api.calls]
    assert ("request_space_hardware", (BE, "zero-a10g"), {}) in api.calls
    assert names.index("request_space_hardware") < names.index("upload_folder")


# -- the frontend's credentials for a private GPU tier -------------------------------------------
def test_backend_auth_headers():
    from splitspace.cpu_frontend.hop.hub_auth import backend_auth_headers

    assert backend_auth_headers(None) == {}
    assert backend_auth_headers(" ") == {}
    assert backend_auth_headers("hf_abc") == {"Authorization": "Bearer hf_abc"}


def test_cli_deploys_through_hfapi_and_a_failing_call_is_one_line_without_secrets(monkeypatch):
    import huggingface_hub

    made: list[UploadCheckingApi] = []

    class FailingApi(UploadCheckingApi):
        def __init__(self, token: str | None = None) -> None:
            super().__init__()
            self.token = token
            made.append(self)

        def add_space_variable(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("403 Forbidden")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    monkeypatch.setenv("SPLITSPACE_SECRET", "cli-secret-abcdefghijklmnop")
    monkeypatch.delenv("SPLITSPACE_ADMIN_TOKEN", raising=False)
    result = CliRunner().invoke(
        cli_app,
        [
            "deploy",
            "--frontend-space",
            FE,
            "--backend-space",
            BE,
            "--token",
            "hf_deploy_token_abc",
            "--frontend-token",
            "hf_frontend_token_abc",
        ],
    )
    assert result.exit_code == 1
    assert made and made[0].token == "hf_deploy_token_abc"
    assert "add_space_variable" in result.output and "403 Forbidden" in result.output
    assert "Traceback" not in result.output
    admin = next(c[1][2] for c in made[0].calls if c[1][1:2] == ("SPLITSPACE_ADMIN_TOKEN",))
    for value in ("cli-secret-abcdefghijklmnop", "hf_deploy_token_abc", "hf_frontend_token_abc", admin):
        assert value not in result.output


# -- a developer's app (issue 23): `splitspace deploy APP` -------------------------------------------
def _an_app(root: Path) -> Path:
    """A developer's folder: the app (named app.py, as on Spaces), a module and a package of
    its own, a requirements.txt, and what must stay home (a virtual environment, data)."""
    root.mkdir(parents=True)
    (root / "app.py").write_text(
        textwrap.dedent("""\
        import gradio as gr

        import splitspace
        from helpers import exclaim
        from mypkg.words import WORD


        @splitspace.gpu
        def shout(text: str) -> str:
            return exclaim(text.upper() + " " + WORD)


        ui = gr.Interface(shout, gr.Textbox(label="Text"), gr.Textbox(), api_name="shout")
    """)
    )
    (root / "helpers.py").write_text("def exclaim(text):\n    return text + '!'\n")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "words.py").write_text("WORD = 'LOUD'\n")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "big.py").write_text("")
    (root / "data").mkdir()
    (root / "data" / "notebook.py").write_text("")
    (root / "examples").mkdir()
    (root / "examples" / "cat.png").write_bytes(b"\x89PNG not really")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "env").mkdir()
    (root / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "requirements.txt").write_text(
        "pillow>=10  # images\ngradio>=5.0\nsplitspace\n\n# a comment\n--extra-index-url https://example.org/simple\n"
    )
    return root / "app.py"


def test_dry_run_bundles_a_developers_app(tmp_path):
    app_file = _an_app(tmp_path / "mine")
    result = CliRunner().invoke(
        cli_app,
        [
            "deploy",
            f"{app_file}:ui",
            "--frontend-space",
            FE,
            "--backend-space",
            BE,
            "--public-backend",
            "--dry-run",
            str(app_file.parent / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    for tier in (FRONTEND, BACKEND):
        bundle = app_file.parent / "out" / tier
        carried = sorted(str(p.relative_to(bundle / "app")) for p in (bundle / "app").rglob("*") if p.is_file())
        # the app's files as its Space would hold them; no environment, cache or git folder,
        # nor the bundles themselves (this dry run writes inside the app's folder)
        assert carried == [
            "app.py",
            "data/notebook.py",
            "examples/cat.png",
            "helpers.py",
            "mypkg/__init__.py",
            "mypkg/words.py",
        ]
        assert (bundle / "app" / "app.py").read_text() == app_file.read_text()
        entry = (bundle / "app.py").read_text()
        assert "os.environ[\"SPLITSPACE_APP\"] = f\"{HERE / 'app' / 'app.py'}:ui\"" in entry
        assert entry.index("SPLITSPACE_APP") < entry.index("def main")
        reqs = (bundle / "requirements.txt").read_text().splitlines()
        assert f"gradio=={gradio.__version__}" in reqs and "pillow>=10" in reqs
        assert "--extra-index-url https://example.org/simple" in reqs
        assert f"# gradio>=5.0  (splitspace pins gradio=={gradio.__version__})" in reqs
        assert "# splitspace  (carried in this folder)" in reqs
        assert not [line for line in reqs if line.startswith(("gradio>", "splitspace"))]
        assert any(line.startswith("spaces==") for line in reqs)  # @splitspace.gpu wraps with spaces.GPU
        assert front_matter(bundle / "README.md")["title"].startswith("app")
    assert "SPLITSPACE_MODEL" not in result.output  # the app loads its own weights
    assert "app app.py:ui" in result.output


def test_deploy_refuses_a_bad_app_before_any_call(tmp_path):
    result = CliRunner().invoke(
        cli_app,
        ["deploy", str(tmp_path / "nope.py"), "--frontend-space", FE, "--backend-space", BE, "--public-backend"],
    )
    assert result.exit_code == 2 and "error: no such file" in result.output


ENTRY_PROBE = ISOLATE.replace(
    'runpy.run_path("app.py", run_name="__main__")',
    textwrap.dedent("""\
    runpy.run_path("app.py")  # not __main__: sets SPLITSPACE_APP, does not serve
    import os
    from splitspace.shared.app.loader import gpu_endpoints, load_app
    spec = os.environ["SPLITSPACE_APP"]
    print("app", spec)
    print("endpoints", [e.api_name for e in gpu_endpoints(load_app(spec))])
    import splitspace, helpers  # helpers: the app's own module, importable once the app is loaded
    print("splitspace", splitspace.__file__)
    print("helpers", helpers.__file__)
    print("answer", load_app(spec).fns[0].fn("hi"))
"""),
)


@pytest.mark.parametrize("tier", [FRONTEND, BACKEND])
def test_a_bundles_entry_loads_the_app_from_its_own_folder(tmp_path, tier):
    """Each bundle's app.py names the app's file in the bundle, and the app loads from there
    with splitspace from the bundle, the repository out of reach."""
    app_file = _an_app(tmp_path / "mine")
    deploy(
        DeployOptions(FE, BE, private_backend=False, app=AppSpec.parse(f"{app_file}:ui")),
        dry_run=tmp_path / "out",
        environ={},
        echo=lambda _: None,
    )
    bundle = (tmp_path / "out" / tier).resolve()
    (bundle.parent / "probe.py").write_text(ENTRY_PROBE.format(repo=str(REPO)))
    run = subprocess.run(
        [sys.executable, str(bundle.parent / "probe.py")],
        cwd=bundle,
        env=bundle_env({}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert lines["app"] == f"{bundle / 'app' / 'app.py'}:ui"
    assert lines["endpoints"] == "['shout']"
    assert lines["splitspace"] == str(bundle / "splitspace" / "__init__.py")
    assert lines["helpers"] == str(bundle / "app" / "helpers.py")
    assert lines["answer"] == "HI LOUD!"


def test_bundles_of_an_app_serve_its_gpu_function_on_their_own(tmp_path):
    """examples/shout.py deployed: both bundles run for real from their folders, talking to
    each other. Needs the serving path for the call itself (the frontend serving the app and
    forwarding /shout, the GPU tier running it)."""
    out = tmp_path / "bundles"
    deploy(
        DeployOptions(FE, BE, private_backend=False, app=AppSpec.parse(str(REPO / "examples" / "shout.py"))),
        dry_run=out,
        environ={},
        echo=lambda _: None,
    )
    with serving_bundles(out, tmp_path, {"SPLITSPACE_STATE_PATH": str(tmp_path / "state.sqlite3")}) as (_, frontend):
        # needs the serving path: the app's function, called through the frontend, runs on the GPU tier
        assert Client(frontend.url, verbose=False).predict("hi", 2, api_name="/shout") == "HI HI"
