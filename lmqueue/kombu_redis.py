"""Reading kombu's Redis structures: the queue lists and the unacked hash with its index.

kombu keeps a queue `Q` as Redis lists `Q`, `Q:1`..`Q:9` (priority steps), every key under the
deployment's prefix (`P:Q`, `P:unacked`). A message a worker
has taken but not acked sits in the hash `unacked` (delivery tag -> JSON [message, exchange,
routing key]) and the sorted set `unacked_index` (delivery tag -> time taken). A message is
JSON whose base64 `body` is JSON `[args, kwargs, embed]`; our task's kwargs carry `job_ids`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from lmqueue.contract import redis_key_prefix, redis_queue_keys

# kombu's names, under the deployment's global key prefix (lmqueue.broker sets it). `prefix`
# arguments below: None = this process's settings.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
PAGE = 1000


def unacked_keys(prefix: str | None = None) -> tuple[str, str]:
    """The deployment's unacked hash and its index."""
    pre = redis_key_prefix() if prefix is None else prefix
    return pre + UNACKED_KEY, pre + UNACKED_INDEX_KEY


def job_ids_of(message: Any) -> list[str]:
    """The job ids a kombu message (dict, or its JSON) carries; [] for anything else."""
    try:
        msg = json.loads(message) if isinstance(message, str | bytes) else message
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else {}
        return [str(i) for i in kwargs.get("job_ids") or []]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return []


def waiting_messages(client: redis.Redis, queue: str, prefix: str | None = None) -> int:
    """Messages waiting in the queue's lists (all priority steps)."""
    pipe = client.pipeline(transaction=False)
    for key in redis_queue_keys(queue, prefix):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


def queued_job_ids(
    client: redis.Redis, queue: str, page: int = PAGE, prefix: str | None = None
) -> set[str]:
    """Every job id in the queue's lists, read in pages so a long list never blocks Redis.

    Producers push on the left and workers pop on the right, so reading left-to-right by index
    can show a message twice (a push shifted it) but never skips one that stays in the list.
    """
    ids: set[str] = set()
    for key in redis_queue_keys(queue, prefix):
        start = 0
        while True:
            chunk = cast(list[bytes], client.lrange(key, start, start + page - 1))  # sync client
            for raw in chunk:
                ids.update(job_ids_of(raw))
            if len(chunk) < page:
                break
            start += page
    return ids


@dataclass
class Reserved:
    """One message a worker has taken and not acked yet."""

    tag: str
    queue: str
    message: dict[str, Any]
    delivered_at: float = 0.0

    @property
    def job_ids(self) -> list[str]:
        return job_ids_of(self.message)


def _entries(client: redis.Redis, prefix: str | None) -> Iterator[tuple[str, Any]]:
    for tag, raw in client.hscan_iter(unacked_keys(prefix)[0], count=PAGE):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, list) and len(entry) == 3:
            yield (tag.decode() if isinstance(tag, bytes) else str(tag)), entry


def reserved_counts(
    client: redis.Redis, queues: Iterable[str], prefix: str | None = None
) -> dict[str, int]:
    """Unacked messages per queue (the routing key is the queue name)."""
    counts = dict.fromkeys(queues, 0)
    for _tag, (_msg, _exchange, routing_key) in _entries(client, prefix):
        if routing_key in counts:
            counts[routing_key] += 1
    return counts


def reserved_messages(client: redis.Redis, queue: str, prefix: str | None = None) -> list[Reserved]:
    """The queue's unacked messages with the time each was taken."""
    entries = _entries(client, prefix)
    found = [Reserved(tag, rk, msg) for tag, (msg, _ex, rk) in entries if rk == queue]
    if found:
        index = unacked_keys(prefix)[1]
        pipe = client.pipeline(transaction=False)
        for r in found:
            pipe.zscore(index, r.tag)
        for r, score in zip(found, pipe.execute(), strict=True):
            r.delivered_at = float(score) if score is not None else 0.0
    return found


def forget_reserved(client: redis.Redis, tags: Iterable[str], prefix: str | None = None) -> int:
    """Drop unacked entries whose holder is gone; the store, not Redis, decides what runs."""
    hash_key, index = unacked_keys(prefix)
    pipe = client.pipeline(transaction=False)
    n = 0
    for tag in tags:
        pipe.zrem(index, tag)
        pipe.hdel(hash_key, tag)
        n += 1
    if n:
        pipe.execute()
    return n
