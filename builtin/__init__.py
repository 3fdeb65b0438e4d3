"""The built-in app: text-to-image written on the developer API, as any app would be.

``splitspace dev`` with no APP serves :data:`APP`, exactly as ``splitspace dev`` with that
file would. Its page is the project's (``builtin/page.py``), its model the GPU
tier's (``gpu_backend/workload``, loaded from ``SPLITSPACE_MODEL`` and changed live by the
operators' ``splitspace model``).

May import splitspace.shared and gpu_backend.workload (its model, at first use only: the
frontend imports this app too); never cpu_frontend: the GPU tier loads this app whole, page
(``page.py``) included, and its bundle carries no frontend.
"""

from __future__ import annotations

from pathlib import Path

APP = str(Path(__file__).with_name("text_to_image_app.py"))
"""The built-in app's file, as ``SPLITSPACE_APP`` names an app."""


def is_builtin(app: str | None) -> bool:
    """Whether ``app`` (an APP, ``file.py`` or ``file.py:NAME``) is the built-in app."""
    if not app:
        return False
    file, _, name = app.partition(":")
    try:
        same = Path(file).expanduser().resolve() == Path(APP).resolve()
    except OSError:
        return False
    return same and name in ("", "demo")
