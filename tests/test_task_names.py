"""What Flower shows of a message: a compact rendering of its job ids that names every one (Flower
cuts arguments at ~1 KB, which showed 29 of a batch message's 32 ids), and batch task ids known
before sending."""

from __future__ import annotations

import re

from lmqueue.batches.ingest import job_id_prefix, line_job_id
from lmqueue.contract import batch_task_id, describe_job_ids
from lmqueue.tables import new_id


def _expand(text: str) -> set[str]:
    """Read describe_job_ids' rendering back into ids."""
    ids: set[str] = set()
    for head, ranges in re.findall(r"(\S+?)\[([\d,-]+)\]", text):
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            ids |= {f"{head}{n:08x}" for n in range(int(lo), int(hi or lo) + 1)}
    return ids


def test_a_batch_message_is_short_and_complete() -> None:
    prefix = job_id_prefix(new_id("batch"))
    lines = [*range(1, 30), 31, 32, 33]  # 32 lines, one gap
    ids = [line_job_id(prefix, n) for n in lines]
    text = describe_job_ids(ids)
    assert len(text) < 100 and "[1-29,31-33] (32 jobs)" in text
    assert _expand(text) == set(ids)


def test_plain_job_ids_are_listed_as_they_are() -> None:
    single = new_id("job")
    assert describe_job_ids([single]) == single
    mixed = [line_job_id("job_abc", 7), "job_not_a_line"]
    text = describe_job_ids([*mixed, line_job_id("job_abc", 8)])
    assert "job_not_a_line" in text and "job_abc[7-8]" in text and "(3 jobs)" in text


def test_batch_task_ids_name_their_batch() -> None:
    batch = new_id("batch")
    assert batch_task_id(batch, 0, 3).startswith(batch)
    assert len({batch_task_id(batch, m, k) for m in range(2) for k in range(3)}) == 6


def test_a_resumed_ingest_derives_the_same_job_ids() -> None:
    batch = new_id("batch")
    assert job_id_prefix(batch) == job_id_prefix(batch)
    assert job_id_prefix(batch) != job_id_prefix(new_id("batch"))
