"""The GPU tier: admission, per-client fair scheduling, the model executor."""

from splitspace.gpu_backend.workload.import_notices import drop_torchvision_fallback_notices

drop_torchvision_fallback_notices()  # before any module of this package imports diffusers
