"""The CLI's HTTP client for a running API: base URL and bearer key from Settings."""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from lmqueue.settings import get_settings


def api_client(timeout_s: float = 120) -> httpx.Client:
    s = get_settings()
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    return httpx.Client(base_url=s.api_url, headers=headers, timeout=timeout_s)


def checked(resp: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx answer; otherwise exit with the API's own error message."""
    if resp.status_code >= 400:
        try:
            msg = resp.json()["error"]["message"]
        except Exception:
            msg = resp.text
        raise SystemExit(f"error {resp.status_code}: {msg}")
    data: dict[str, Any] = resp.json()
    return data


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (`lmqueue submit --url ...`): a parent parser. Their
    defaults are set once on the main parser (SUPPRESS here: a nested subcommand that does not
    see the option must not reset what an outer one parsed)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log everything (INFO), not only problems",
    )
    p.add_argument(
        "--url", default=argparse.SUPPRESS, help="the API's URL (default LMQUEUE_API_URL)"
    )
    return p
