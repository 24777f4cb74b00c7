"""How fast the API accepts a big batch, and how much memory it takes.

Starts a real API (SQLite by default; BENCH_DB=postgres for a fresh PostgreSQL database) with
a model that has no worker, uploads an N-line JSONL file (default 50,000), creates the batch
and waits until it is `in_progress` (validated, inserted, enqueued). Prints the times and the
API process's RSS before and its peak (VmHWM) after. Asserts nothing about speed.

    python -m bench.ingest [N]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import (
    bench_stack,
    now,
    proc_status,
    upload,
    wait_batch,
    write_input,
)

TINY = Path.home() / ".cache" / "lmqueue-tests" / "tiny"


def main(n: int = 50_000) -> None:
    with bench_stack({"idle": str(TINY)}) as st:
        st.start_api()
        assert st.api is not None
        path = Path(tempfile.mkdtemp()) / "input.jsonl"
        size = write_input(path, n, "idle")
        with st.client() as client:
            # Warm up (imports, first DB connection, Celery producer) so RSS is a fair baseline.
            small = Path(tempfile.mkdtemp()) / "warm.jsonl"
            write_input(small, 10, "idle")
            warm = client.post(
                "/v1/batches",
                json={"input_file_id": upload(client, small), "endpoint": "/v1/completions"},
            ).json()
            wait_batch(client, warm["id"], lambda b: b["status"] != "validating")
            before = proc_status(st.api.pid)

            t0 = now()
            file_id = upload(client, path)
            t1 = now()
            batch = client.post(
                "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions"}
            ).json()
            t2 = now()
            done = wait_batch(
                client, batch["id"], lambda b: b["status"] != "validating", every_s=0.1
            )
            t3 = now()
            after = proc_status(st.api.pid)
        assert done["status"] == "in_progress", done
        assert done["request_counts"]["total"] == n, done["request_counts"]
        print(f"lines={n} file={size / 1e6:.1f} MB")
        print(
            f"upload={t1 - t0:.2f}s create={t2 - t1:.3f}s validate+insert+enqueue="
            f"{t3 - t2:.2f}s total={t3 - t0:.2f}s"
        )
        print(
            f"api rss_before={before['VmRSS'] / 1024:.0f} MiB "
            f"peak_after={after['VmHWM'] / 1024:.0f} MiB "
            f"growth={(after['VmHWM'] - before['VmRSS']) / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
