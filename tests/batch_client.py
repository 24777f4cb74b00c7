"""Helpers for the bulk batch tests: a stack with small limits, input files, the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openai import OpenAI

from cli.procs import wait_until
from cli.stack import Stack, running

TERMINAL = ("completed", "failed", "expired", "cancelled")
# Small limits so the limit tests stay small; the defaults are 50,000 lines and 200 MB.
MAX_LINES = 1000
MAX_FILE_BYTES = 1_000_000


def batch_stack(
    database_url: str, redis_url: str, tiny: Path, tmp: Path, workers: tuple[str, ...] = ("tiny",)
) -> Iterator[Stack]:
    """API + a worker for "tiny". "idle" (generate) and "emb" (embed) have no worker."""
    models_file = tmp / "models.toml"
    models_file.write_text(
        f'[models.tiny]\npath = "{tiny}"\n'
        f'[models.idle]\npath = "{tiny}"\n'
        f'[models.emb]\npath = "{tiny}"\ntask = "embed"\n'
    )
    st = Stack(
        database_url,
        redis_url,
        {"tiny": tiny, "idle": tiny, "emb": tiny},
        tmp / "logs",
        extra_env={
            "LMQUEUE_MODELS_FILE": str(models_file),
            "LMQUEUE_DATA_DIR": str(tmp / "data"),
            "LMQUEUE_BATCH_MAX_LINES": str(MAX_LINES),
            "LMQUEUE_BATCH_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        },
    )
    (tmp / "logs").mkdir(exist_ok=True)
    with running(st, workers):
        yield st


def line(
    custom_id: str,
    model: str = "tiny",
    prompt: str = "def main():",
    url: str = "/v1/completions",
    **body: Any,
) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "max_tokens": 3, "temperature": 0, **body}
    if url == "/v1/chat/completions":
        payload["messages"] = [{"role": "user", "content": prompt}]
    elif url == "/v1/embeddings":
        payload = {"model": model, "input": prompt}
    else:
        payload["prompt"] = prompt
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": payload}


def jsonl(lines: list[Any]) -> bytes:
    """Lines as JSONL; a str item is written as is (for invalid lines)."""
    return b"".join(
        (item if isinstance(item, str) else json.dumps(item)).encode() + b"\n" for item in lines
    )


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def create(client: OpenAI, lines: list[Any], endpoint: str = "/v1/completions", **kw: Any) -> Any:
    f = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=kw.pop("completion_window", "24h"),
        **kw,
    )


def wait_batch(client: OpenAI, batch_id: str, until: Any, timeout_s: float = 120) -> Any:
    """Poll batches.retrieve (which advances the batch) until `until(batch)` holds."""

    def check() -> Any:
        b = client.batches.retrieve(batch_id)
        return b if until(b) else None

    return wait_until(check, timeout_s, f"batch {batch_id}", every_s=0.2)


def wait_done(client: OpenAI, batch_id: str, timeout_s: float = 120) -> Any:
    return wait_batch(client, batch_id, lambda b: b.status in TERMINAL, timeout_s)


def content_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
