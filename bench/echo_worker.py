"""`python -m bench.echo_worker <celery args>`: a Celery worker whose models are all served by
the EchoEngine (bench/bulk.py). The stack starts it in place of `python -m celery`
(cli.stack.Stack.worker_module)."""

from __future__ import annotations

import sys

from celery.__main__ import main as celery_main

from bench.echo_engine import EchoEngine
from worker.loading import set_engine_factory

if __name__ == "__main__":
    set_engine_factory(lambda spec: EchoEngine(spec.name))
    sys.exit(celery_main())
