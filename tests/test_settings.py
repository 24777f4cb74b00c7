"""Settings: one class, read from env, overridable; .env.example lists every variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmqueue.broker import celery_config
from lmqueue.settings import Settings, get_settings, reset_settings
from scripts.env_example import render

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_is_current() -> None:
    assert (ROOT / ".env.example").read_text() == render(), (
        "regenerate: python scripts/env_example.py > .env.example"
    )


def test_env_overrides_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMQUEUE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("DATABASE_URL", "sqlite:////tmp/x.db")
    reset_settings()
    try:
        s = get_settings()
        assert s.max_batch_size == 7
        assert s.resolved_database_url() == "sqlite:////tmp/x.db"
    finally:
        reset_settings()


def test_default_database_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, database_url="")
    assert s.resolved_database_url() == f"sqlite:///{tmp_path.resolve() / 'lmqueue.db'}"


def test_task_sent_events_follow_the_setting() -> None:
    # Off by default (Flower shows a request once a worker receives it: test_observability).
    assert celery_config(Settings())["task_send_sent_event"] is False
    assert celery_config(Settings(flower_sent_events=True))["task_send_sent_event"] is True
