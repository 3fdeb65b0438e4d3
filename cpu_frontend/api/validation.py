"""Checking a call of a developer's GPU function at the frontend, before it joins the door.

A stub until the real module lands (another change writes it): it checks nothing, so the
GPU tier, which validates every call again, is the one that refuses a bad input.
"""

from __future__ import annotations

from typing import Any

from splitspace.shared.app.loader import GpuEndpoint


def validate_call(endpoint: GpuEndpoint, payloads: list[Any], max_file_bytes: int) -> None:
    """Raise ValidationFailed naming the input (by its label) that the GPU tier would refuse."""
    return None
