"""The stock transport never leaves a caller hanging when gradio_client gives up on a job.

Under 64 concurrent callers, about one call in a few hundred through a shared
``gradio_client.Client`` ends with its job's future cancelled inside gradio_client
(``bench/hop.py`` sees the same with the plain Gradio baseline: 5 of 640). ``job.result()`` then raises
``concurrent.futures.CancelledError``; crossing ``asyncio.to_thread`` it became a
cancellation of the caller's own task, and Gradio never answered that caller (a hang,
measured with ``bench/hop.py``). The race cannot be produced on demand, so this test
stands in a job in that state for gradio_client's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from splitspace.cpu_frontend.hop.gradio_client_transport import GradioClientTransport
from splitspace.shared.contract.errors import BackendUnavailable
from splitspace.shared.contract.schema import GenerateRequest


class CancelledJob:
    def done(self) -> bool:
        return True

    def outputs(self) -> list:
        return []

    def result(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
        raise concurrent.futures.CancelledError()


class ClientWithCancelledJobs:
    def submit(self, *args, **kwargs) -> CancelledJob:  # type: ignore[no-untyped-def]
        return CancelledJob()

    def close(self) -> None:
        pass


def test_a_job_cancelled_inside_gradio_client_is_a_clear_error():
    async def call() -> None:
        transport = GradioClientTransport("http://127.0.0.1:9", timeout_s=2)
        transport._client = ClientWithCancelledJobs()  # type: ignore[assignment]
        try:
            async for _ in transport.stream(GenerateRequest("a fox"), {}):
                pass
        finally:
            await transport.aclose()

    with pytest.raises(BackendUnavailable, match="cancelled"):
        asyncio.run(call())
