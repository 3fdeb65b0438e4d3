"""Cost estimates for admission, calibrated by measured GPU time.

Admission needs a cost before a job runs (to reserve quota and to order the
fair queue); the model gives a first guess from steps and pixels, and every
finished batch nudges a calibration factor toward what the GPU really took.
The scheduler then settles each job with its measured share.
"""

from __future__ import annotations

from collections.abc import Callable


class CostModel:
    def __init__(self, base_estimate: Callable[[int, int, int, float, int], float], *, smoothing: float = 0.2) -> None:
        """``base_estimate(steps, width, height, guidance_scale, batch)`` in seconds, usually
        ``ModelExecutor.estimate_seconds`` (guidance above 1 doubles the UNet's work)."""
        self._base = base_estimate
        self._smoothing = smoothing
        self.factor = 1.0

    def estimate(self, steps: int, width: int, height: int, guidance_scale: float, batch: int = 1) -> float:
        return max(1e-3, self._base(steps, width, height, guidance_scale, batch) * self.factor)

    def observe(
        self, steps: int, width: int, height: int, guidance_scale: float, batch: int, measured_s: float
    ) -> None:
        """Fold one measured batch into the calibration factor (bounded, smoothed)."""
        base = self._base(steps, width, height, guidance_scale, batch)
        if base <= 0 or measured_s <= 0:
            return
        ratio = min(20.0, max(0.05, measured_s / base))
        self.factor += self._smoothing * (ratio - self.factor)
