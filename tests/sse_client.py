"""A tiny server-sent events reader for tests (the wire format, parsed by hand on purpose: the
tests check what a plain client sees)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


def read_events(
    client: httpx.Client,
    path: str,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    timeout_s: float = 120,
) -> list[Event]:
    """Events until the server ends the stream (or `stop_after` events, then hang up)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[Event] = []
    fields: dict[str, str] = {}
    with client.stream("GET", path, headers=headers, timeout=timeout_s) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith(":"):
                continue  # a keep-alive comment
            if line:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
                continue
            if "data" in fields:
                data = fields["data"]
                out.append(
                    Event(fields.get("event", "message"), fields.get("id"), json.loads(data))
                )
            fields = {}
            if stop_after is not None and len(out) >= stop_after:
                break
    return out
