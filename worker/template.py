"""A pre-imported template that forks workers: `python -m worker.template`.

A new worker spends ~7 s importing Python, torch and transformers before it loads its model
(14-20 s with two starting on a small host). The template pays that once: it imports the
worker's libraries, never initialises CUDA, and then forks one child per request, which only
swaps in its own environment (model, CUDA_VISIBLE_DEVICES, metrics port) and runs Celery's
command line. Each child initialises CUDA itself, after the fork, pinned to its own GPU.

Protocol (one JSON object per line): the parent writes {"argv": [...], "env": {...}} on our
stdin; we answer on stdout {"ready": true} once imported, {"spawned": pid} per request and
{"exited": pid, "code": n} when a child ends (we are its parent, so we reap it). A child's own
output goes to our stderr. stdin closed: we wait for our children and exit.

Single-threaded on purpose: forking a process with other threads can copy a held lock.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import runpy
import select
import signal
import sys
from typing import Any

# What every worker imports before it can load a model. worker.celery_app is left out: it
# reads the settings at import, and each child must read its own.
PRELOAD = (
    "torch",
    "transformers",
    "celery.bin.celery",
    "celery.apps.worker",
    "celery.concurrency.thread",
    "kombu.transport.redis",
    "sqlalchemy",
    "lmqueue.db",
    "lmqueue.transitions",
    "worker.runtime",
)


# Imported while a model loads (from_pretrained), when installed: half a cold start otherwise.
LOAD_TIME = ("transformers.modeling_utils", "transformers.generation.utils", "torchao")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    import transformers

    # transformers resolves its classes lazily: touch the ones the loader uses.
    for cls in ("AutoModelForCausalLM", "AutoModel", "AutoTokenizer", "AutoConfig"):
        getattr(transformers, cls)
    for name in LOAD_TIME:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    _preload_architectures()


def _preload_architectures() -> None:
    """The modeling modules of the registry's models (read from their configs, no weights)."""
    from transformers import AutoConfig

    from lmqueue.registry import get_registry

    try:
        specs = list(get_registry().values())
    except Exception:  # a broken registry is the workers' to report, not the template's
        return
    for spec in specs:
        try:
            kind = AutoConfig.from_pretrained(spec.path).model_type
            importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
        except Exception:
            continue  # a hub id offline, an unusual layout: the worker imports it itself


def _say(out: Any, **message: Any) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _child(argv: list[str], env: dict[str, str], out_fd: int) -> None:
    """In the forked child: become the worker `argv` (`python -m MODULE ...`). Never returns."""
    code = 1
    try:
        os.close(out_fd)  # the protocol pipe is the template's, not the worker's
        os.dup2(2, 1)  # the worker's stdout joins the template's stderr (the pool's log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        from lmqueue.settings import reset_settings

        reset_settings()
        module = argv[argv.index("-m") + 1]
        sys.argv = [module, *argv[argv.index("-m") + 2 :]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # the child must never fall back into the template's loop
        print(f"worker.template: child failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(out: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say(out, exited=pid, code=os.waitstatus_to_exitcode(status))


def serve(inp: Any = None, out: Any = None) -> int:
    inp = inp or sys.stdin
    out = out or sys.stdout
    preload()
    _say(out, ready=True, pid=os.getpid())
    while True:
        _reap(out)
        readable, _, _ = select.select([inp], [], [], 0.2)
        if not readable:
            continue
        line = inp.readline()
        if not line:
            break  # the pool is gone or closing: children were told to stop
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["argv"], request["env"], out.fileno())
        _say(out, spawned=pid)
    while True:  # reap what is left, reporting each exit, then go
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        _say(out, exited=pid, code=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool stops us by closing stdin
    sys.exit(serve())
