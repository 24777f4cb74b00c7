"""The `lmqueue` command line (also `python -m cli`): run the stack or its parts, and talk to a
running API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from cli.batch import add_batch_commands
from cli.client import api_client, checked, common_options
from cli.keys import add_keys_commands
from lmqueue.commands import flower_argv, worker_argv
from lmqueue.logs import setup_logging, status
from lmqueue.settings import get_settings, reset_settings
from scheduler.main import add_scheduler_commands

log = logging.getLogger("lmqueue")


# --- running services -------------------------------------------------------------------------


def cmd_migrate(_args: argparse.Namespace) -> int:
    from lmqueue.migrate import upgrade_head

    url = get_settings().resolved_database_url()
    upgrade_head(url)
    print(f"database at head: {url}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from lmqueue.exposure import ExposureError, api_problems, ensure_safe

    s = get_settings()
    host = args.host or s.api_host
    # The app re-checks at startup from the host setting, so pass the real bind address on.
    os.environ["LMQUEUE_API_HOST"] = host
    reset_settings()
    try:
        ensure_safe(api_problems(get_settings(), host), "the API")
    except ExposureError as exc:
        print(f"lmqueue: {exc}", file=sys.stderr)
        return 2
    port = args.port or s.api_port
    level = setup_logging("api", args.verbose)
    status("api listening on http://%s:%d", host, port)
    uvicorn.run(
        "api.app:app",
        host=host,
        port=port,
        log_level=logging.getLevelName(level).lower(),
        access_log=level <= logging.INFO,  # a line per request only when asked for
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from lmqueue.registry import get_registry

    s = get_settings()
    model = args.model or s.worker_model or next(iter(sorted(get_registry())), "")
    if not model:
        print("no model configured: set LMQUEUE_MODELS or LMQUEUE_MODELS_FILE", file=sys.stderr)
        return 2
    env = {**os.environ, "LMQUEUE_WORKER_MODEL": model}
    argv = worker_argv(model, args.concurrency or s.effective_concurrency())
    # exec, not a child: SIGTERM (docker stop) must reach Celery for its warm shutdown.
    os.execve(argv[0], argv, env)


def cmd_flower(args: argparse.Namespace) -> int:
    from lmqueue.exposure import ExposureError, ensure_safe, flower_problems

    s = get_settings()
    address = args.address or s.flower_host
    try:
        ensure_safe(flower_problems(s, address), "Flower")
    except ExposureError as exc:
        print(f"lmqueue: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if s.flower_basic_auth:  # Flower reads FLOWER_BASIC_AUTH itself; never put it in argv
        env["FLOWER_BASIC_AUTH"] = s.flower_basic_auth
    argv = flower_argv(args.port or s.flower_port, address, s.task_events)
    os.execve(argv[0], argv, env)


def cmd_up(args: argparse.Namespace) -> int:
    from cli.local import run_local_stack

    if args.verbose:  # the children read it: every process of the stack logs at INFO
        os.environ["LMQUEUE_LOG_LEVEL"] = "INFO"

    return run_local_stack(port=args.port, flower=not args.no_flower, workers=args.workers)


# --- client commands --------------------------------------------------------------------------


def _output_text(job: dict[str, Any]) -> str:
    choice = (job.get("response") or {}).get("choices", [{}])[0]
    return str(choice.get("text") or (choice.get("message") or {}).get("content") or "")


def cmd_submit(args: argparse.Namespace) -> int:
    if args.chat:
        endpoint = "/v1/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]}
    else:
        endpoint, body = "/v1/completions", {"prompt": args.prompt}
    body.update(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.seed is not None:
        body["seed"] = args.seed
    with api_client() as client:
        job = checked(
            client.post(
                "/v1/jobs",
                json={
                    "model": args.model,
                    "endpoint": endpoint,
                    "body": body,
                    "priority": args.priority,
                },
            )
        )
        if not args.wait:
            print(job["id"])
            return 0
        while job["status"] in ("queued", "running"):
            job = checked(client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}))
    if job["status"] != "succeeded":
        print(
            f"{job['id']} {job['status']}: {(job.get('error') or {}).get('message')}",
            file=sys.stderr,
        )
        return 1
    print(_output_text(job))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with api_client() as client:
        job = checked(client.get(f"/v1/jobs/{args.id}", params={"wait": args.wait}))
    print(json.dumps(job, indent=2))
    return 0


def cmd_build_demo_model(args: argparse.Namespace) -> int:
    # Building needs torch, which this light package never imports: run the worker's builder.
    argv = [sys.executable, "-m", "worker.demo_model", str(args.out), "--size", args.size]
    return subprocess.call(argv)


def cmd_tune(args: argparse.Namespace) -> int:
    # Tuning runs the model (torch): the worker's tuner runs in its own process.
    return subprocess.call([sys.executable, "-m", "worker.tune", *args.tune_args])


# --- wiring -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(prog="lmqueue", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    plain_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return plain_add(name, parents=[common], **kw)  # every subcommand takes them

    sub.add_parser = add_parser  # type: ignore[method-assign]

    up = sub.add_parser("up", help="run the whole stack locally (embedded defaults)")
    up.add_argument("--port", type=int, default=None, help="API port (default 8000)")
    up.add_argument("--workers", type=int, default=1, help="worker processes per model")
    up.add_argument("--no-flower", action="store_true")
    up.set_defaults(fn=cmd_up)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(fn=cmd_migrate)

    api = sub.add_parser("api", help="run the API server")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(fn=cmd_api)

    w = sub.add_parser("worker", help="run a worker for one model")
    w.add_argument("--model")
    w.add_argument("--concurrency", type=int, default=0)
    w.set_defaults(fn=cmd_worker)

    f = sub.add_parser("flower", help="run Flower against the configured broker")
    f.add_argument("--port", type=int)
    f.add_argument("--address", help="bind address (default LMQUEUE_FLOWER_HOST)")
    f.set_defaults(fn=cmd_flower)

    s = sub.add_parser("submit", help="submit one job")
    s.add_argument("prompt")
    s.add_argument("--model", required=True)
    s.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--priority", type=int, default=5)
    s.add_argument("--wait", action="store_true", help="wait and print the generated text")
    s.set_defaults(fn=cmd_submit)

    g = sub.add_parser("get", help="show one job")
    g.add_argument("id")
    g.add_argument("--wait", type=float, default=0)
    g.set_defaults(fn=cmd_get)

    b = sub.add_parser("build-demo-model", help="build a small random-weight model locally")
    b.add_argument("out", type=Path)
    b.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    b.set_defaults(fn=cmd_build_demo_model)

    t = sub.add_parser(
        "tune",
        help="measure throughput at growing slot counts; recommend max_batch_size and "
        "the prefill budget (python -m worker.tune --help)",
        add_help=False,
    )
    t.add_argument("tune_args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_tune)

    add_keys_commands(sub)
    add_batch_commands(sub)  # lmqueue batch run|status|cancel|retry|results
    add_scheduler_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Shared options default to "absent" (see cli.client.common_options).
    args.verbose, args.url = getattr(args, "verbose", False), getattr(args, "url", None)
    if args.url:  # before anything reads the settings
        os.environ["LMQUEUE_API_URL"] = args.url
        reset_settings()
    setup_logging("cli", args.verbose)
    try:
        return int(args.fn(args))
    except httpx.TransportError as exc:
        url = get_settings().api_url
        print(
            f"lmqueue: cannot reach the API at {url} ({type(exc).__name__}: {exc}); is it "
            "running (`lmqueue up`)? Point the CLI at it with --url or LMQUEUE_API_URL",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
