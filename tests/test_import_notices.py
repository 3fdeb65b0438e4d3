"""transformers' two torchvision notices on every GPU-tier start are dropped, and nothing else.

(The real start is checked in ``tests/test_dev.py``: `splitspace dev` prints neither.)
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import splitspace.gpu_backend as gpu_backend  # noqa: F401  (installs the filter, as every GPU-tier module's import does)
from splitspace.gpu_backend.import_notices import NOTICE_LOGGER
from tests.support import REPO

CLIP = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
        "for backward compatibility. Install torchvision to use the default backend, or import "
        "`CLIPImageProcessorPil` directly to silence this warning.")


def test_only_the_torchvision_fallback_notice_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(NOTICE_LOGGER)
    with caplog.at_level(logging.WARNING, logger=NOTICE_LOGGER):
        logger.warning(CLIP)
        logger.warning(CLIP.replace("CLIP", "Siglip"))
        logger.warning("`Foo` requires torchvision (not installed)")  # not the fallback notice
        logger.warning("something else transformers says")
    assert [r.getMessage() for r in caplog.records] == [
        "`Foo` requires torchvision (not installed)", "something else transformers says",
    ]


def test_importing_the_pipelines_prints_no_torchvision_notice() -> None:
    """What every start printed: importing diffusers' pipelines through the GPU tier's model code."""
    done = subprocess.run(
        [sys.executable, "-c", "import gpu_backend.tiny; import logging; "
                               f"logging.getLogger({NOTICE_LOGGER!r}).warning('still heard')"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr, done.stderr[-2000:]
    assert "still heard" in done.stderr
