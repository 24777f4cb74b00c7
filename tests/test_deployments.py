"""Several stacks on one Redis: every kombu key lives under the deployment's namespace, so two
stacks with the same queue prefix and model name never take each other's messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.stack import Stack
from lmqueue.broker import celery_config
from lmqueue.contract import redis_key_prefix
from lmqueue.settings import Settings
from lmqueue.tables import JobStatus
from tests.scheduler_load import submit_many

N = 200


def test_the_deployment_defaults_to_the_store_identity() -> None:
    a = Settings(database_url="sqlite:////tmp/a.db")
    b = Settings(database_url="sqlite:////tmp/b.db")
    assert a.deployment_name() == Settings(database_url="sqlite:////tmp/a.db").deployment_name()
    assert a.deployment_name() != b.deployment_name()
    named = Settings(database_url="sqlite:////tmp/a.db", deployment="prod")
    assert redis_key_prefix(named) == "prod:"
    opts = celery_config(named)["broker_transport_options"]
    assert opts["global_keyprefix"] == "prod:"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_stacks_share_one_redis_without_skipping(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Same queue prefix, same model name, same Redis: only the stores differ.
    shared_prefix = f"lmqshared{tmp_path.name[-12:].replace('_', '')}"
    stacks = [
        Stack(
            f"sqlite:///{tmp_path / name / 'lmqueue.db'}",
            redis_url,
            {"tiny": tiny_model_dir},
            tmp_path / name,
            queue_prefix=shared_prefix,
        )
        for name in ("one", "two")
    ]
    for st in stacks:
        st.log_dir.mkdir()
    assert stacks[0].queue("tiny") == stacks[1].queue("tiny")
    assert stacks[0].key_prefix != stacks[1].key_prefix
    workers = []
    try:
        for st in stacks:
            st.migrate()
            workers.append(st.start_worker("tiny"))
        ids = [submit_many(st, "tiny", N) for st in stacks]
        for st, mine in zip(stacks, ids, strict=True):
            jobs = st.wait_jobs_done(mine, timeout_s=240)
            assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}
            # One attempt each: no job waited for the reaper to re-send a message.
            assert {j.attempts for j in jobs} == {1}
    finally:
        for st in stacks:
            st.stop()
    for worker in workers:
        log = worker.log_path.read_text(errors="replace")
        assert "'skipped': 0" in log  # the task's summary is logged: the check can fail
        assert "'skipped': 1" not in log, "a worker took another stack's message"
        assert "unknown to this worker's store" not in log
