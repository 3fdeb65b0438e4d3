"""A job as the API shows it (``GET /v1/jobs/{id}``, lists, webhook bodies): one function.

Outputs' files become ``{"type": "file", "url", "name", "mime_type", "size"}`` (the URL
answers only the job's owner, as the job does), with ``"b64"`` too when asked
(``?include=b64``); links are absolute, made from the URL the caller used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitspace.cpu_frontend.jobs.records import FILE_REF, Attempt, Job


def _files(value: Any, url: str, b64: Mapping[int, str] | None) -> Any:
    if isinstance(value, list):
        return [_files(v, url, b64) for v in value]
    if isinstance(value, dict):
        index = value.get(FILE_REF)
        if isinstance(index, int):
            out = {
                "type": "file",
                "url": f"{url}/files/{index}",
                "name": value.get("name"),
                "mime_type": value.get("mime_type"),
                "size": value.get("size"),
            }
            if b64 is not None and index in b64:
                out["b64"] = b64[index]
            return out
        return {k: _files(v, url, b64) for k, v in value.items()}
    return value


def file_indexes(value: Any) -> list[int]:
    """The file indexes an output payload refers to."""
    if isinstance(value, list):
        return [i for v in value for i in file_indexes(v)]
    if isinstance(value, dict):
        index = value.get(FILE_REF)
        if isinstance(index, int):
            return [index]
        return [i for v in value.values() for i in file_indexes(v)]
    return []


def job_view(
    job: Job, base_url: str, attempts: list[Attempt] | None = None, b64: Mapping[int, str] | None = None
) -> dict[str, Any]:
    url = f"{base_url.rstrip('/')}/v1/jobs/{job.id}"
    doc: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "endpoint": f"/{job.endpoint}",
        "status": job.status,
        "created_at": round(job.created_at, 3),
        "started_at": None if job.started_at is None else round(job.started_at, 3),
        "finished_at": None if job.finished_at is None else round(job.finished_at, 3),
        "expires_at": None if job.expires_at is None else round(job.expires_at, 3),
    }
    if not job.ended:
        doc["position"] = job.position
        doc["eta_s"] = job.eta_s
    if job.status == "succeeded":
        doc["outputs"] = _files(job.outputs, url, b64)
    if job.error is not None:
        doc["error"] = job.error
    doc["webhook"] = None if job.webhook is None else {"url": job.webhook.url, "events": list(job.webhook.events)}
    if attempts is not None:
        doc["webhook_attempts"] = [a.to_dict() for a in attempts]
    doc["links"] = {"self": url, "cancel": f"{url}/cancel"}
    return doc
