"""One Settings object, read from env and `.env`, built lazily and overridable in tests."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LMQUEUE_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Path(".lmqueue")
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("DATABASE_URL", "LMQUEUE_DATABASE_URL"),
        description="SQLAlchemy URL; empty means SQLite at <data_dir>/lmqueue.db",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "LMQUEUE_REDIS_URL"),
    )
    embedded_redis: Literal["auto", "never", "always"] = "auto"

    # --- models ------------------------------------------------------------------------------
    models_file: Path | None = None
    # Shortcut when no models file is given: "name=path_or_hub_id[,name2=...]".
    models: str = ""
    worker_model: str = ""  # the model a worker process serves (set by `lmqueue worker`)

    # --- queue and delivery -----------------------------------------------------------------
    queue_prefix: str = "lmqueue"
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: int = Field(default=20, ge=0, le=60_000)
    max_batch_tokens: int = Field(default=16_384, ge=64)
    worker_concurrency: int = Field(default=0, ge=0, description="0 = max_batch_size")
    # Above the longest allowed job, so a long job's message is never redelivered while it runs.
    visibility_timeout_s: int = 3600
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    max_attempts: int = 3
    default_priority: int = Field(default=5, ge=0, le=9)

    # --- API ---------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"  # where the CLI finds the API
    api_key: str = ""  # the CLI's bearer key
    long_poll_max_s: float = 60.0
    max_request_bytes: int = 1_000_000

    # --- flower ------------------------------------------------------------------------------
    flower_port: int = 5555

    # --- engine ------------------------------------------------------------------------------
    # Length buckets: a generate() call is closed before its padded prompt positions would
    # exceed this fraction (rows sorted by length first); 1.0 turns bucketing off. Loose, because
    # every call decodes separately and bigger decode batches are cheaper per token.
    bucket_max_waste: float = Field(default=0.5, ge=0.0, le=1.0)
    # Within a call, the prefill runs in length groups padded at most this much, merged into one
    # decode batch afterwards; 1.0 = one padded prefill per call.
    prefill_max_waste: float = Field(default=0.1, ge=0.0, le=1.0)
    # Shared-prefix KV reuse: a batch whose prompts share at least this many leading tokens,
    # with at least prefix_min_rows rows, computes the prefix once. 0 turns it off.
    prefix_min_tokens: int = Field(default=32, ge=0)
    prefix_min_rows: int = Field(default=2, ge=2)

    @field_validator("models_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v  # `.env.example` writes unset paths as empty strings

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lmqueue.db').resolve()}"

    def effective_concurrency(self) -> int:
        return self.worker_concurrency or self.max_batch_size


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached Settings so the next get_settings() re-reads the environment (tests)."""
    get_settings.cache_clear()
