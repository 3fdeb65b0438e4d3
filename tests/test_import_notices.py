"""transformers' two torchvision notices on every GPU-tier start are dropped, and nothing else.

(The real start is checked in ``tests/test_dev.py``: `splitspace dev` prints neither.)
"""

from __future__ import annotations

import logging
import subprocess
import sys

import splitspace.gpu_backend as gpu_backend  # noqa: F401  (installs the filter, as every GPU-tier module's import does)
from splitspace.gpu_backend.workload.import_notices import NOTICE_LOGGER
from tests.support import REPO

CLIP = (
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
    "for backward compatibility. Install torchvision to use the default backend, or import "
    "`CLIPImageProcessorPil` directly to silence this warning."
)


class _Heard(logging.Handler):
    """What reaches the notice logger's own handlers (transformers stops its records from
    propagating to the root logger once it is imported, so pytest's caplog may hear nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_torchvision_fallback_notice_is_dropped() -> None:
    logger = logging.getLogger(NOTICE_LOGGER)
    heard, level = _Heard(), logger.level
    logger.addHandler(heard)
    logger.setLevel(logging.WARNING)
    try:
        logger.warning(CLIP)
        logger.warning(CLIP.replace("CLIP", "Siglip"))
        logger.warning("`Foo` requires torchvision (not installed)")  # not the fallback notice
        logger.warning("something else transformers says")
    finally:
        logger.removeHandler(heard)
        logger.setLevel(level)
    assert heard.messages == ["`Foo` requires torchvision (not installed)", "something else transformers says"]


def test_importing_the_pipelines_prints_no_torchvision_notice() -> None:
    """What every start printed: importing diffusers' pipelines through the GPU tier's model code."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import splitspace.gpu_backend.workload.tiny; import logging; "
            f"logging.getLogger({NOTICE_LOGGER!r}).warning('still heard')",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr, done.stderr[-2000:]
    assert "still heard" in done.stderr
