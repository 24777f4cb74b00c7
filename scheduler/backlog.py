"""How much work each model has: waiting messages, reserved messages, running jobs, and the
batch lines the dispatcher still holds back (in messages' worth: they would have been waiting
messages before lines were metered, and the workers they need must be started all the same).

The backlog counts work in progress once: a worker that holds a message has claimed its jobs
within milliseconds, so `reserved` (Redis) and `running` (store) describe the same work from two
sides. We take the larger of the two rather than their sum, which would make one busy worker
with an empty queue ask for a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session

from lmqueue.batches.dispatch import held_messages
from lmqueue.jobs import open_job_counts
from lmqueue.kombu_redis import reserved_counts, waiting_messages
from lmqueue.settings import get_settings
from lmqueue.tables import JobStatus


@dataclass(frozen=True)
class Backlog:
    waiting: int  # messages in the queue's Redis lists
    reserved: int  # messages taken by workers, not acked yet (kombu's `unacked`)
    running: int  # jobs running in the store
    held: int = 0  # held batch lines, in messages of batch_lines_per_message

    @property
    def total(self) -> int:
        return self.waiting + self.held + max(self.reserved, self.running)

    def describe(self) -> str:
        held = f", held {self.held}" if self.held else ""
        return f"waiting {self.waiting}{held}, reserved {self.reserved}, running {self.running}"


def measure(client: redis.Redis, session: Session, queues: Mapping[str, str]) -> dict[str, Backlog]:
    """Backlog per model; `queues` maps model -> queue name."""
    reserved = reserved_counts(client, queues.values())
    counts = open_job_counts(session)
    running = {m: n for (m, status), n in counts.items() if status == JobStatus.RUNNING}
    held = held_messages(session, get_settings())
    return {
        model: Backlog(
            waiting_messages(client, q),
            reserved.get(q, 0),
            running.get(model, 0),
            held.get(model, 0),
        )
        for model, q in queues.items()
    }
