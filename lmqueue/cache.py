"""The exact result cache: a deterministic request answered before is answered again from the
store, without a worker.

A succeeded job with a `cache_key` is a cache entry. The key hashes the tenant (API key), the
model's name and revision (lmqueue.revision), the endpoint and the whole canonical body (every
sampling parameter with its default filled in, seed, stop), so two tenants never share an entry
(a shared cache would leak prompts across users, through answers or timing). Entries live
`cache_ttl_s`; `prune` keeps at most `cache_max_entries` by clearing the oldest keys.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from lmqueue.metrics import CACHE_LOOKUPS
from lmqueue.registry import get_model
from lmqueue.revision import model_revision
from lmqueue.schemas import EMBEDDINGS, SamplingFields, parse_body
from lmqueue.settings import Settings
from lmqueue.tables import Job, JobStatus, SemanticEntry, now

# Fields that change how a request is delivered, never what it answers.
_NOT_ANSWER = {"cache", "stream", "user", "metadata"}


def deterministic(endpoint: str, parsed: Any) -> bool:
    """Embeddings always; generation at temperature 0 or with an explicit seed."""
    if endpoint == EMBEDDINGS:
        return True
    return isinstance(parsed, SamplingFields) and (
        parsed.temperature == 0 or parsed.seed is not None
    )


def canonical(endpoint: str, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(parsed body, canonical dict): defaults filled in, so `{"temperature": 0}` and
    `{"temperature": 0.0, "top_p": 1}` are the same request."""
    parsed = parse_body(endpoint, body)
    data = parsed.model_dump(mode="json")
    return parsed, {k: v for k, v in data.items() if k not in _NOT_ANSWER}


def scope_digest(owner: str, model: str, endpoint: str, canonical_body: dict[str, Any]) -> str:
    revision = model_revision(get_model(model))
    text = json.dumps([owner, model, revision, endpoint, canonical_body], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(
    owner: str, model: str, endpoint: str, body: dict[str, Any], settings: Settings
) -> str | None:
    """The request's key, or None when it is not cacheable (off, opted out, sampled)."""
    if not settings.cache_enabled or body.get("cache") is False:
        return None
    parsed, data = canonical(endpoint, body)
    if not deterministic(endpoint, parsed):
        return None
    return scope_digest(owner, model, endpoint, data)


def _live(t: float, settings: Settings) -> Any:
    return (Job.status == JobStatus.SUCCEEDED) & (Job.finished_at >= t - settings.cache_ttl_s)


def lookup(session: Session, owner: str, key: str, settings: Settings) -> Job | None:
    """The newest live entry for `key` of this owner (the owner is in the key too)."""
    stmt = (
        select(Job)
        .where(Job.cache_key == key, Job.owner == owner, _live(now(), settings))
        .order_by(Job.finished_at.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def lookup_many(session: Session, owner: str, keys: set[str], settings: Settings) -> dict[str, str]:
    """{key: job id} of the live entries among `keys` (batch ingest: one query per chunk)."""
    if not keys:
        return {}
    stmt = select(Job.cache_key, Job.id).where(
        Job.cache_key.in_(list(keys)), Job.owner == owner, _live(now(), settings)
    )
    return {str(k): str(i) for k, i in session.execute(stmt)}


def count(model: str, kind: str, hit: bool) -> None:
    CACHE_LOOKUPS.labels(model, kind, "hit" if hit else "miss").inc()


def prune(session: Session, settings: Settings, t: float) -> int:
    """Expired entries, then the oldest beyond `cache_max_entries`, stop being entries (their
    jobs stay). Returns how many left. The scheduler runs it now and then."""
    expired = session.execute(
        update(Job)
        .where(Job.cache_key.is_not(None), Job.finished_at < t - settings.cache_ttl_s)
        .values(cache_key=None)
        .execution_options(synchronize_session=False)
    )
    left = int(expired.rowcount)  # type: ignore[attr-defined]
    session.execute(  # the semantic cache's vectors of expired prompts
        delete(SemanticEntry).where(SemanticEntry.created_at < t - settings.cache_ttl_s)
    )
    entries = select(func.count()).where(
        Job.cache_key.is_not(None), Job.status == JobStatus.SUCCEEDED
    )
    over = int(session.scalar(entries) or 0) - settings.cache_max_entries
    if over > 0:
        oldest = (
            select(Job.id)
            .where(Job.cache_key.is_not(None), Job.status == JobStatus.SUCCEEDED)
            .order_by(Job.finished_at)
            .limit(over)
        )
        ids = list(session.scalars(oldest))
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(cache_key=None)
            .execution_options(synchronize_session=False)
        )
        left += len(ids)
    return left


def shown_result(result: Any, cache_hit: Any) -> Any:
    """A job's answer as the API shows it. A job answered without computing its prompt (a
    result-cache hit, or a batch line that copied an identical line: `cache_hit` is set)
    counts its whole prompt as cached (`usage.prompt_tokens_details.cached_tokens`, or
    `input_tokens_details` in the Responses shape), as OpenAI reports prompt tokens it did not
    compute; the stored answer stays the computed one. Embeddings have no such field."""
    if cache_hit is None or not isinstance(result, dict):
        return result
    if not isinstance(result.get("usage"), dict):
        return result
    usage = dict(result["usage"])
    for total, details in (
        ("prompt_tokens", "prompt_tokens_details"),
        ("input_tokens", "input_tokens_details"),
    ):
        if total in usage and (details in usage or result.get("object") != "list"):
            usage[details] = {**(usage.get(details) or {}), "cached_tokens": usage[total]}
            break
    return {**result, "usage": usage}
