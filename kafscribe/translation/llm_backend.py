"""Any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, OpenAI), any target language.

Segments are sent in batches (bounded by count and characters, to fit the
model's context); the model answers a JSON array with one translation per
segment, so every translated segment keeps its source timing. 429, 5xx,
timeouts and malformed answers are retried with exponential backoff; any
other 4xx fails the job with the provider's message. A user and password in
``KAFSCRIBE_LLM_BASE_URL`` (``https://user:pw@host/v1``) are sent as HTTP Basic
auth and never become part of a request URL, a log line or a job's error.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from schemas.events import Segment, Transcript, Translation

from ..errors import TransientError
from ..settings import Settings, mask_url_userinfo
from .base import TranslationError, language_name

log = logging.getLogger("kafscribe.llm")

SYSTEM_PROMPT = (
    "You are a professional translator. You receive a JSON array of transcript segments in {source}. "
    "Translate every segment into {target}. Reply with only a JSON array of exactly {count} strings, "
    "the translations in the same order, one per input segment. Do not merge or split segments."
)


class _Retryable(TransientError):
    """A failed call worth making again (timeouts, 429, 5xx)."""


def batches(segments: list[Segment], max_segments: int, max_chars: int) -> list[list[Segment]]:
    """Consecutive groups of at most ``max_segments`` segments and ``max_chars`` characters."""
    out: list[list[Segment]] = []
    current: list[Segment] = []
    chars = 0
    for seg in segments:
        if current and (len(current) >= max_segments or chars + len(seg.text) > max_chars):
            out.append(current)
            current, chars = [], 0
        current.append(seg)
        chars += len(seg.text)
    if current:
        out.append(current)
    return out


def endpoint(base_url: str) -> tuple[str, dict[str, str]]:
    """The chat-completions URL of ``base_url`` without its userinfo, and the Basic auth header it stood for."""
    parts = urllib.parse.urlsplit(base_url.rstrip("/"))
    userinfo, at, host = parts.netloc.rpartition("@")
    headers: dict[str, str] = {}
    if at:
        user, _, password = userinfo.partition(":")
        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)) + "/chat/completions", headers


class LLMTranslator:
    name = "llm"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def translate(self, transcript: Transcript, target: str) -> Translation:
        s = self.settings
        if not s.llm_base_url or not s.llm_model:
            raise TranslationError("no LLM configured: set KAFSCRIBE_LLM_BASE_URL and KAFSCRIBE_LLM_MODEL")
        translated: list[Segment] = []
        for group in batches(transcript.segments, s.llm_batch_segments, s.llm_batch_chars):
            texts = self._translate_batch([seg.text.strip() for seg in group], transcript.language, target)
            translated += [
                Segment(id=seg.id, start=seg.start, end=seg.end, text=text,
                        avg_logprob=seg.avg_logprob, no_speech_prob=seg.no_speech_prob)
                for seg, text in zip(group, texts, strict=True)
            ]
        return Translation(
            source_language=transcript.language, target_language=target, backend=self.name,
            text=" ".join(seg.text.strip() for seg in translated).strip(), segments=translated,
        )

    def _translate_batch(self, texts: list[str], source: str, target: str) -> list[str]:
        s = self.settings
        body = {
            "model": s.llm_model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT.format(
                    source=language_name(source), target=language_name(target), count=len(texts))},
                {"role": "user", "content": json.dumps(texts, ensure_ascii=False)},
            ],
        }
        errors: list[str] = []
        for attempt in range(s.llm_retries + 1):
            if attempt:
                time.sleep(min(s.llm_retry_base_s * 2 ** (attempt - 1), 60.0))
            try:
                return self._call(body, len(texts))
            except _Retryable as exc:
                errors.append(str(exc))
                log.warning("LLM request failed (attempt %d): %s", attempt + 1, exc)
        raise TranslationError(f"LLM translation failed after {len(errors)} attempts: " + "; ".join(errors))

    def _call(self, body: dict, count: int) -> list[str]:
        s = self.settings
        url, auth = endpoint(s.llm_base_url)
        headers = {"Content-Type": "application/json", **auth}
        if s.llm_api_key:
            headers["Authorization"] = f"Bearer {s.llm_api_key}"
        try:
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        except ValueError as exc:
            raise TranslationError(f"KAFSCRIBE_LLM_BASE_URL is not a URL: {mask_url_userinfo(str(exc))}") from exc
        try:
            with urllib.request.urlopen(req, timeout=s.llm_timeout_s) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            message = _provider_message(exc.read())
            if exc.code == 429 or exc.code >= 500 or exc.code == 408:
                raise _Retryable(f"HTTP {exc.code}: {message}") from exc
            raise TranslationError(f"LLM provider refused the request (HTTP {exc.code}): {message}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise _Retryable("the provider answered something that is not JSON") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise _Retryable("no choices[0].message.content in the answer") from exc
        texts = _parse_array(content)
        if texts is None or len(texts) != count:
            got = "no JSON array" if texts is None else f"{len(texts)} items"
            raise _Retryable(f"expected a JSON array of {count} strings, got {got}")
        return texts


def _parse_array(content: str) -> list[str] | None:
    match = re.search(r"\[.*\]", content, re.S)  # tolerate ```json fences and chatter around the array
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list):
        return None
    return [str(v) for v in value]


def _provider_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    except (json.JSONDecodeError, AttributeError):
        return raw.decode(errors="replace")[:500]
