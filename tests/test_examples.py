"""The examples in ``examples/`` (issue 23): each is an ordinary Gradio app with its GPU
functions marked ``@splitspace.gpu``; the frontend imports each without torch or a model,
and each still runs in one process, as plain Gradio would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support import REPO

EXAMPLES = {
    "shout.py": ["shout"],
    "mirror.py": ["mirror"],
    "text_to_image.py": ["generate"],
    # gr.ChatInterface's events that call the chat function (submit, its API, retry, edit)
    "chat.py": ["_submit_fn", "chat", "_submit_fn_1", "_submit_fn_2"],
}
HEAVY = ("torch", "diffusers", "transformers")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env},
    )


def test_every_example_is_tested():
    assert sorted(p.name for p in (REPO / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_frontend_imports_an_example_without_torch_or_diffusers(name):
    """As the frontend loads it: the app's Blocks and its GPU events, nothing heavy."""
    run = _python(f"""
        import sys
        from splitspace.shared.app.loader import gpu_endpoints, load_app
        demo = load_app("examples/{name}")
        print([e.api_name for e in gpu_endpoints(demo)])
        print([m for m in {HEAVY!r} if m in sys.modules])
    """)
    assert run.returncode == 0, run.stderr
    endpoints, heavy = run.stdout.strip().splitlines()[-2:]
    assert endpoints == repr(EXAMPLES[name])
    assert heavy == "[]", f"importing examples/{name} loaded {heavy}"


def test_each_example_runs_in_one_process_as_plain_gradio():
    """The decorated functions are ordinary callables (``python examples/x.py`` runs them
    under ``spaces.GPU``, a no-op off ZeroGPU); text_to_image on the ``tiny`` pipeline."""
    run = _python(
        """
        import runpy
        from PIL import Image
        assert runpy.run_path("examples/shout.py")["shout"]("hi", 2) == "HI HI"
        picture = Image.new("RGB", (2, 1))
        picture.putpixel((0, 0), (255, 0, 0))
        mirror = runpy.run_path("examples/mirror.py")["mirror"]
        assert mirror(picture, False).getpixel((1, 0)) == (255, 0, 0)
        assert mirror(picture, True).getpixel((0, 0)) == (255, 0, 0)
        ns = runpy.run_path("examples/text_to_image.py")
        image = ns["generate"]("a cat", 1, 64, 3)
        assert image.size == (64, 64), image.size
        assert ns["pipe"]() is ns["pipe"]()  # loaded once, at first use
        print("ok")
    """,
        MODEL_ID="tiny",
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
