"""`python -m bench.echo_worker <celery args>`: a Celery worker whose models are all served by
the EchoBackend (bench/bulk.py). The stack starts it in place of `python -m celery`
(cli.stack.Stack.worker_module)."""

from __future__ import annotations

import sys

from celery.__main__ import main as celery_main

from bench.echo_engine import EchoBackend
from worker.runtime import set_backend_factory

if __name__ == "__main__":
    set_backend_factory(lambda spec: EchoBackend(spec.name))
    sys.exit(celery_main())
