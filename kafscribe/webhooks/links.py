"""The links of a job (API answers and callback bodies), built in one place.

The base is ``KAFSCRIBE_PUBLIC_URL`` when set. The ingress may instead use a
request's allowed ``Host`` (``producers/ingress/links.py``); a worker, which
has no request, falls back to the ingress's own listen address.
"""

from __future__ import annotations

from kafscribe.settings import Settings


def job_links(base: str, job_id: str) -> dict[str, str]:
    """``self`` and ``transcript`` links of ``job_id`` under ``base`` (``""``: relative links)."""
    return {
        "self": f"{base}/v1/jobs/{job_id}",
        "transcript": f"{base}/v1/jobs/{job_id}/transcript",
    }


def configured_base(settings: Settings) -> str:
    """The base of links built outside a request: the public URL, else the ingress's address."""
    return settings.public_url.rstrip("/") or f"http://{settings.http_host}:{settings.http_port}"
