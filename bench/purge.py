"""Retention purge rate: rows deleted per second by lmqueue.retention.purge, on a scratch
PostgreSQL database (BENCH_DB=sqlite for SQLite), in its bounded transactions of purge_chunk
rows.

Seeds N finished single jobs, N/5,000 finished batches of 5,000 lines each (with their output
file rows) and N/100 expired uploaded files (content on disk), all past retention, plus as many
rows that must stay (open jobs, a running batch), then runs purge passes until one deletes
nothing. Prints rows/s (all tables).

    python -m bench.purge [N] [LMQUEUE_SETTING=VALUE ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import Table, func, insert, select

from bench.common import DEFAULT_PG
from cli.procs import scratch_postgres_database
from lmqueue.db import dispose_engines, session_scope
from lmqueue.migrate import upgrade_head
from lmqueue.settings import get_settings, reset_settings
from lmqueue.tables import Batch, FileObject, Job

LINES_PER_BATCH = 5000


def _job(i: str, t: float, batch_id: str | None, status: str) -> dict[str, Any]:
    return {
        "id": i,
        "owner": "k",
        "model": "m",
        "endpoint": "/v1/completions",
        "body": {"prompt": "x" * 200, "max_tokens": 16},
        "status": status,
        "priority": 2,
        "batch_id": batch_id,
        "result": {"choices": [{"text": "y" * 100}]} if status == "succeeded" else None,
        "created_at": t,
        "finished_at": t if status == "succeeded" else None,
        "attempts": 1,
    }


def seed(n: int, files_dir: Path) -> int:
    """Rows past retention (returned count) and as many that must stay."""
    old, t = time.time() - 40 * 86400, time.time()
    jobs: Table = Job.__table__  # type: ignore[assignment]
    with session_scope() as s:
        for start in range(0, n, 5000):
            rows = [
                _job(f"job_old{i:09d}", old, None, "succeeded")
                for i in range(start, min(n, start + 5000))
            ]
            s.execute(insert(jobs), rows)
            keep = [
                _job(f"job_new{i:09d}", t, None, "queued")
                for i in range(start, min(n, start + 5000))
            ]
            s.execute(insert(jobs), keep)
        batches = max(1, n // LINES_PER_BATCH)
        for b in range(batches):
            bid = f"batch_old{b:06d}"
            s.add(
                Batch(
                    id=bid,
                    owner="k",
                    endpoint="/v1/completions",
                    input_file_id="f",
                    completion_window="24h",
                    status="completed",
                    created_at=old,
                    completed_at=old,
                )
            )
            s.add(
                FileObject(
                    id=f"file_out{b:06d}",
                    owner="k",
                    filename="o",
                    purpose="batch_output",
                    source_batch_id=bid,
                    created_at=old,
                    expires_at=old + 1,
                )
            )
            rows = [
                _job(f"job_b{b:06d}{i:06d}", old, bid, "succeeded") for i in range(LINES_PER_BATCH)
            ]
            s.execute(insert(jobs), rows)
        s.add(
            Batch(
                id="batch_live",
                owner="k",
                endpoint="/v1/completions",
                input_file_id="f",
                completion_window="24h",
                status="in_progress",
                created_at=old,
            )
        )
        files_dir.mkdir(parents=True, exist_ok=True)
        for f in range(max(1, n // 100)):
            name = f"file_up{f:06d}.jsonl"
            (files_dir / name).write_bytes(b"x" * 10_000)
            s.add(
                FileObject(
                    id=f"file_up{f:06d}",
                    owner="k",
                    filename="in",
                    purpose="batch",
                    bytes=10_000,
                    storage_path=name,
                    created_at=old,
                    expires_at=old + 3600,
                )
            )
    return n + batches * (LINES_PER_BATCH + 2) + max(1, n // 100)


def main(n: int = 100_000, extra: dict[str, str] | None = None) -> None:
    from lmqueue.files import files_dir
    from lmqueue.retention import purge

    with ExitStack() as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="lmqpurge-"))
        if os.environ.get("BENCH_DB", "postgres") == "postgres":
            admin = os.environ.get("TEST_POSTGRES_URL", DEFAULT_PG)
            url = cleanup.enter_context(scratch_postgres_database(admin))
        else:
            url = f"sqlite:///{tmp / 'purge.db'}"
        upgrade_head(url)
        os.environ.update({"DATABASE_URL": url, "LMQUEUE_DATA_DIR": str(tmp), **(extra or {})})
        reset_settings()
        dispose_engines()
        settings = get_settings()
        expected = seed(n, files_dir(settings))
        print(
            f"load average: {os.getloadavg()[0]:.2f}; db {url.split('://')[0]}; "
            f"{expected} rows past retention, chunk {settings.purge_chunk}"
        )
        total: Counter[str] = Counter()
        t0 = time.perf_counter()
        while True:
            report = purge(time.time(), settings)
            total.update(report.rows)
            if not report.rows:
                break
        elapsed = time.perf_counter() - t0
        with session_scope() as s:
            left = s.scalar(select(func.count()).select_from(Job)) or 0
        deleted = sum(total.values())
        print(
            f"purged {dict(total)} = {deleted} rows in {elapsed:.2f} s: "
            f"{deleted / elapsed:.0f} rows/s; {left} open jobs kept; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        assert deleted == expected and left == n, (deleted, expected, left)
        dispose_engines()


if __name__ == "__main__":
    args = sys.argv[1:]
    count = int(args.pop(0)) if args and args[0].isdigit() else 100_000
    main(count, dict(a.split("=", 1) for a in args))
