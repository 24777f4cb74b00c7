"""How much work each model has: waiting messages, reserved messages, running jobs, and the
batch lines the dispatcher still holds back (in messages' worth: they would have been waiting
messages before lines were metered, and the workers they need must be started all the same).

The backlog counts work in progress once: a worker that holds a message has claimed its jobs
within milliseconds, so `reserved` (Redis) and `running` (store) describe the same work from two
sides. We take the larger of the two rather than their sum, which would make one busy worker
with an empty queue ask for a second.

A bulk message carries up to LMQUEUE_BATCH_LINES_PER_MESSAGE jobs, so messages under-count a
batch: the store's queued + running jobs are a second measure, and the larger one wins.
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
    queued: int = 0  # jobs queued in the store (a bulk message counts as its jobs)

    @property
    def total(self) -> int:
        # Messages (held lines in messages' worth) or jobs, whichever says more: a bulk message
        # of 32 lines is one message but 32 jobs of work.
        messages = self.waiting + self.held + max(self.reserved, self.running)
        return max(messages, self.queued + self.running)

    def describe(self) -> str:
        held = f", held {self.held}" if self.held else ""
        return (
            f"waiting {self.waiting}{held}, reserved {self.reserved}, running {self.running}, "
            f"queued jobs {self.queued}"
        )


def measure(client: redis.Redis, session: Session, queues: Mapping[str, str]) -> dict[str, Backlog]:
    """Backlog per model; `queues` maps model -> queue name."""
    reserved = reserved_counts(client, queues.values())
    counts = open_job_counts(session)
    running = {m: n for (m, status), n in counts.items() if status == JobStatus.RUNNING}
    held = held_messages(session, get_settings())
    queued = {m: n for (m, status), n in counts.items() if status == JobStatus.QUEUED}
    return {
        model: Backlog(
            waiting_messages(client, q),
            reserved.get(q, 0),
            running.get(model, 0),
            held.get(model, 0),
            queued.get(model, 0),
        )
        for model, q in queues.items()
    }
