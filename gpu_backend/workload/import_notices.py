"""Two notices transformers logs on every start of the GPU tier, dropped where they are logged.

Why it exists: importing diffusers' pipelines makes transformers resolve
``CLIPImageProcessor`` and ``SiglipImageProcessor``. Without torchvision (this
project does not need it) transformers 5 hands out the PIL implementations
instead, which is what those names meant before transformers 5, and logs one
warning for each ("`CLIPImageProcessor` requires torchvision (not installed);
falling back to `CLIPImageProcessorPil` ..."): two lines on every start that ask
nothing of an operator. :class:`TorchvisionFallbackNotice` drops exactly those
records on the logger that emits them; every other record passes.
"""

from __future__ import annotations

import logging
import re

NOTICE_LOGGER = "transformers.utils.import_utils"
NOTICE = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)


class TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' "requires torchvision ...; falling back to ...Pil" notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return NOTICE.match(record.getMessage()) is None


def drop_torchvision_fallback_notices() -> None:
    """Install the filter (once) on the logger transformers emits the notice from; safe
    before transformers is imported (it gets the same logger by name)."""
    logger = logging.getLogger(NOTICE_LOGGER)
    if not any(isinstance(f, TorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(TorchvisionFallbackNotice())
