"""`lmqueue batch ...`: run a JSONL file as a bulk batch with a progress bar, and manage batches.

    lmqueue batch run input.jsonl -o output.jsonl [--errors errors.jsonl] [--window 24h]
    lmqueue batch status|cancel|retry BATCH_ID
    lmqueue batch results BATCH_ID [-o FILE] [--after CURSOR] [--wait]

Talks to the API at LMQUEUE_API_URL (bearer LMQUEUE_API_KEY if set), like `lmqueue submit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

from cli.client import api_client, checked, common_options

TERMINAL = ("completed", "failed", "expired", "cancelled")


def _client() -> httpx.Client:
    return api_client(timeout_s=300)


def _first_url(path: Path) -> str:
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    raise SystemExit(f"cannot read the url of the first line of {path}; pass --endpoint")


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--metadata {pair!r} is not KEY=VALUE")
        out[key] = value
    return out or None


def _download(client: httpx.Client, file_id: str, dest: Path) -> int:
    """Stream a file's content to `dest`; returns the number of lines."""
    lines = 0
    with client.stream("GET", f"/v1/files/{file_id}/content") as resp, dest.open("wb") as out:
        if resp.status_code >= 400:
            resp.read()
            checked(resp)
        for chunk in resp.iter_bytes():
            out.write(chunk)
            lines += chunk.count(b"\n")
    return lines


PLAIN_EVERY_S = 10.0  # without a terminal: one progress line this often


def _follow(client: httpx.Client, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Poll until the batch is terminal: a tqdm bar on a terminal, plain lines otherwise."""
    if not sys.stderr.isatty():
        return _follow_plain(client, batch, poll_s)
    from tqdm import tqdm

    with tqdm(total=None, unit="req", desc=batch["id"], file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            counts = batch["request_counts"]
            if counts["total"] and bar.total != counts["total"]:
                bar.total = counts["total"]
                bar.refresh()
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(
                status=batch["status"], completed=counts["completed"], failed=counts["failed"]
            )
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll_s)
            batch = checked(client.get(f"/v1/batches/{batch['id']}"))


def _follow_plain(client: httpx.Client, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Progress for logs and pipes: a line every PLAIN_EVERY_S seconds, and at the end."""
    next_line = 0.0
    while True:
        done = batch["status"] in TERMINAL
        if done or time.monotonic() >= next_line:
            c = batch["request_counts"]
            print(
                f"{batch['id']}: {batch['status']}, {c['completed']} completed, "
                f"{c['failed']} failed of {c['total']}",
                file=sys.stderr,
                flush=True,
            )
            next_line = time.monotonic() + PLAIN_EVERY_S
        if done:
            return batch
        time.sleep(poll_s)
        batch = checked(client.get(f"/v1/batches/{batch['id']}"))


def _upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        files = {"file": (path.name, fh, "application/jsonl")}
        return checked(client.post("/v1/files", data={"purpose": "batch"}, files=files))


def _report_failed(batch: dict[str, Any]) -> int:
    print(f"batch {batch['id']} failed validation:", file=sys.stderr)
    for err in (batch.get("errors") or {}).get("data") or []:
        where = f"line {err['line']}: " if err.get("line") else ""
        print(f"  {where}{err.get('code')}: {err.get('message')}", file=sys.stderr)
    return 2


def cmd_batch_run(args: argparse.Namespace) -> int:
    endpoint = args.endpoint or _first_url(args.input)
    errors_path = args.errors or args.output.with_name(args.output.stem + ".errors.jsonl")
    with _client() as client:
        f = _upload(client, args.input)
        batch = checked(
            client.post(
                "/v1/batches",
                json={
                    "input_file_id": f["id"],
                    "endpoint": endpoint,
                    "completion_window": args.window,
                    "metadata": _metadata(args.metadata),
                },
            )
        )
        print(f"batch {batch['id']} (input {f['id']}, {f['bytes']} bytes)", file=sys.stderr)
        try:
            batch = _follow(client, batch, args.poll)
        except KeyboardInterrupt:
            print(
                f"\nbatch {batch['id']} keeps running: `lmqueue batch status {batch['id']}`, "
                f"`lmqueue batch cancel {batch['id']}`",
                file=sys.stderr,
            )
            return 130
        if batch["status"] == "failed":
            return _report_failed(batch)
        out_lines = _save(client, batch["output_file_id"], args.output)
        err_id = batch["error_file_id"]
        err_lines = _save(client, err_id, errors_path) if err_id else 0
    counts = batch["request_counts"]
    print(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}; {out_lines} lines -> {args.output}"
        + (f", {err_lines} error lines -> {errors_path}" if err_lines else ""),
        file=sys.stderr,
    )
    return 0 if batch["status"] == "completed" and not counts["failed"] else 1


def _save(client: httpx.Client, file_id: str | None, dest: Path) -> int:
    """Download a result file (an empty file when there is none); returns its line count."""
    if file_id is None:
        dest.write_bytes(b"")
        return 0
    return _download(client, file_id, dest)


def cmd_batch_status(args: argparse.Namespace) -> int:
    with _client() as client:
        print(json.dumps(checked(client.get(f"/v1/batches/{args.id}")), indent=2))
    return 0


def cmd_batch_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = checked(client.post(f"/v1/batches/{args.id}/cancel"))
    print(f"batch {batch['id']} {batch['status']}")
    return 0


def cmd_batch_retry(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = checked(client.post(f"/v1/batches/{args.id}/retry_failed"))
    print(batch["id"])
    return 0


@contextmanager
def _open_out(path: Path | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        return
    with path.open("ab") as f:
        yield f


def cmd_batch_results(args: argparse.Namespace) -> int:
    """Write finished lines page by page; with --wait, until every line has come."""
    after, total = args.after, 0
    with _client() as client, _open_out(args.output) as out:
        while True:
            resp = client.get(
                f"/v1/batches/{args.id}/results", params={"after": after, "limit": 1000}
            )
            if resp.status_code >= 400:
                checked(resp)
            out.write(resp.content)
            out.flush()
            total += int(resp.headers.get("X-Result-Lines", "0"))
            after = resp.headers.get("X-Next-After", after)
            complete = resp.headers.get("X-Results-Complete") == "true"
            if complete or (not args.wait and not resp.content):
                break
            if not resp.content:
                time.sleep(args.poll)
    state = "complete" if complete else f"more to come: --after {after}"
    print(f"{total} lines; {state}", file=sys.stderr)
    return 0


def add_batch_commands(sub: Any) -> None:
    """Register `lmqueue batch ...` on the main parser's subparsers."""
    p = sub.add_parser("batch", help="bulk JSONL batches (OpenAI Batch API)")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    common = common_options()
    plain_add = bsub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return plain_add(name, parents=[common], **kw)

    bsub.add_parser = add_parser  # type: ignore[method-assign]

    run = bsub.add_parser("run", help="upload a JSONL file, follow the batch, download results")
    run.add_argument("input", type=Path, help="OpenAI Batch input file (JSONL)")
    run.add_argument("-o", "--output", type=Path, required=True, help="where results go")
    run.add_argument("--errors", type=Path, help="failed lines (default OUTPUT.errors.jsonl)")
    run.add_argument("--endpoint", help="default: the url of the first line")
    run.add_argument("--window", default="24h", help="completion window: 24h, 7d, 30m, 90s")
    run.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    run.set_defaults(fn=cmd_batch_run)

    for name, fn, text in (
        ("status", cmd_batch_status, "show a batch (JSON)"),
        ("cancel", cmd_batch_cancel, "cancel a batch: queued lines stop, finished ones stay"),
        ("retry", cmd_batch_retry, "new batch of a finished batch's failed lines"),
    ):
        cmd = bsub.add_parser(name, help=text)
        cmd.add_argument("id")
        cmd.set_defaults(fn=fn)

    res = bsub.add_parser("results", help="download finished lines (also while running)")
    res.add_argument("id")
    res.add_argument("-o", "--output", type=Path, help="append to this file (default stdout)")
    res.add_argument("--after", default="", help="cursor printed by the previous call")
    res.add_argument("--wait", action="store_true", help="keep going until every line is in")
    res.add_argument("--poll", type=float, default=1.0)
    res.set_defaults(fn=cmd_batch_results)
