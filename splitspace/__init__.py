"""splitspace: serve GPU models to the public through Gradio, shared fairly among clients.

The design card's folders are installed as this package's subpackages (``pyproject.toml``
maps them; in the repository they stay at the root, each with one job):

- ``splitspace.cpu_frontend``: the public CPU Gradio app (UI and API), validation, the fair door.
- ``splitspace.gpu_backend``: the GPU Gradio app: admission, fair scheduling, the model.
- ``splitspace.session``: identity: session cookies, API keys, the signed cross-tier token.
- ``splitspace.shared``: what both tiers import: schema, settings, errors, the hop's wire form.
- ``splitspace.deploy``: the ``splitspace`` command, the local runner, Spaces bundles.

``splitspace.gpu`` marks a function of an ordinary Gradio app to run on the GPU tier, as
``spaces.GPU`` does for ZeroGPU.

``splitspace.gpu`` marks a function of an ordinary Gradio app to run on the GPU tier, as
``spaces.GPU`` does for ZeroGPU.

One name at the top of site-packages, so a Space's own ``shared/`` or ``session.py``
never shadows splitspace's. Importing this package loads no model, Gradio or torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from splitspace.shared.app.gpu_function import gpu
from splitspace.shared.config.settings import Settings
from splitspace.shared.contract.errors import SplitspaceError, Throttled

try:
    __version__ = version("splitspace")
except PackageNotFoundError:  # a Space bundle carries the package without its metadata
    __version__ = "0+bundled"

__all__ = ["Settings", "SplitspaceError", "Throttled", "__version__", "gpu"]
