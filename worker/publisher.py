"""Publishes the loop's per-step token events to Redis streams, one per streaming job.

Called from the slot loop once per step with the events of every streaming row: they go out in
one pipelined round trip (XADD with an approximate MAXLEN, then EXPIRE), so streaming costs a
step one network round trip however many rows stream. Rows that did not ask to stream produce
no events at all (worker.slot_engine), so they cost nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import redis

from lmqueue.contract import DELTA_START, DELTA_TEXT, DELTA_TOKENS, delta_stream_key
from lmqueue.settings import Settings
from worker.gen_types import TokenEvent

log = logging.getLogger(__name__)

_SEEN_MAX = 100_000  # job ids remembered to mark a first entry; old ones are long finished


class StreamPublisher:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.client, self.settings = client, settings
        self.maxlen, self.ttl = settings.stream_maxlen, settings.stream_ttl_s
        self._seen: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamPublisher:
        return cls(redis.Redis.from_url(settings.redis_url), settings)

    def __call__(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        pipe = self.client.pipeline(transaction=False)
        for ev in events:
            key = delta_stream_key(ev.key, self.settings)
            fields: dict[str, str | int] = {DELTA_TEXT: ev.text, DELTA_TOKENS: ev.completion_tokens}
            if self._first(ev.key):  # readers restart the text when a retried job starts again
                fields[DELTA_START] = 1
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.expire(key, self.ttl)
        pipe.execute()

    def _first(self, job_id: str) -> bool:
        if job_id in self._seen:
            return False
        self._seen[job_id] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return True
