"""A running lmqueue stack for tests and benchmarks: migrated database, API server, worker and
scheduler processes, all real, talking to a real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from cli.procs import Proc, free_port, python_argv, wait_until
from lmqueue.commands import worker_argv
from lmqueue.contract import queue_name, redis_key_prefix, redis_queue_keys
from lmqueue.migrate import upgrade_head
from lmqueue.tables import Job, JobStatus

TERMINAL = set(JobStatus.TERMINAL)


@dataclass
class Stack:
    database_url: str
    redis_url: str
    models: dict[str, Path]
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    # The program workers run with `python -m` (lmqueue.commands.worker_argv): a bench passes a
    # wrapper that installs a stand-in engine; production workers always run plain Celery.
    worker_module: str = "celery"
    queue_prefix: str = field(default_factory=lambda: f"lmqtest{os.getpid()}x{os.urandom(3).hex()}")
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    schedulers: list[Proc] = field(default_factory=list)
    base_url: str = ""
    _engine: Engine | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LMQUEUE_") and k not in ("DATABASE_URL", "REDIS_URL")
        }
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "LMQUEUE_QUEUE_PREFIX": self.queue_prefix,
                "LMQUEUE_MODELS": ",".join(f"{n}={p}" for n, p in self.models.items()),
                "LMQUEUE_EMBEDDED_REDIS": "never",
                "LMQUEUE_DATA_DIR": str(self.log_dir / "data"),  # uploads stay out of the repo
                "LMQUEUE_HEARTBEAT_S": "1",
                # Tests talk to a loopback API without keys; auth tests turn it on in extra_env.
                "LMQUEUE_AUTH_ENABLED": "false",
                # Tests and benches measure computation: a repeated prompt must really run.
                # The result-cache tests turn it on in extra_env.
                "LMQUEUE_CACHE_ENABLED": "false",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def migrate(self) -> None:
        upgrade_head(self.database_url)

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = Proc(
            "api",
            python_argv(
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ),
            self.env,
            self.log_dir,
        )
        wait_until(self._api_up, 60, "the API to answer /healthz")

    def _api_up(self) -> bool:
        assert self.api is not None
        if not self.api.alive():
            raise RuntimeError(f"API exited:\n{self.api.tail()}")
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(
        self,
        model: str,
        concurrency: int = 32,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        log_level: str | None = "INFO",
    ) -> Proc:
        """`log_level`: INFO by default, so a failing test's log shows every task; None keeps
        the worker's own default (WARNING: one start line), as `lmqueue worker` runs it."""
        worker_env = {
            **self.env,
            "LMQUEUE_QUEUE_PREFIX": self.queue_prefix,
            "LMQUEUE_WORKER_MODEL": model,
            **(env or {}),
        }
        argv = worker_argv(model, concurrency, queue=self.queue(model), module=self.worker_module)
        if log_level is not None:
            argv[argv.index("--loglevel") + 1] = log_level
        proc = Proc(f"worker-{model}", argv, worker_env, self.log_dir)
        self.workers.append(proc)
        if wait_ready:
            wait_until(lambda: self._worker_ready(proc), 120, f"worker for {model} to be ready")
        return proc

    def start_scheduler(self, env: dict[str, str] | None = None) -> Proc:
        """The scheduler process (`lmqueue scheduler`); its workers log into its own log."""
        proc = Proc(
            "scheduler",
            python_argv("-m", "cli", "scheduler"),
            {**self.env, "LMQUEUE_SCHEDULER_METRICS_PORT": "0", **(env or {})},
            self.log_dir,
        )
        self.schedulers.append(proc)

        def started() -> bool:
            if not proc.alive():
                raise RuntimeError(f"scheduler exited:\n{proc.tail()}")
            return "scheduler started" in proc.log_path.read_text(errors="replace")

        wait_until(started, 60, "the scheduler to start")
        return proc

    def _worker_ready(self, proc: Proc) -> bool:
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.tail()}")
        log = proc.log_path.read_text(errors="replace")
        return "ready." in log or " ready: model " in log  # Celery's INFO line, or our status line

    def stop(self) -> None:
        for sched in self.schedulers:
            sched.stop(timeout_s=60)  # it stops its own workers (warm shutdown) first
            sched.kill_group()  # anything of its process group still around
        self.schedulers.clear()
        for w in self.workers:
            w.stop()
        self.workers.clear()
        if self.api:
            self.api.stop()
        self.purge_queues()
        if self._engine is not None:
            self._engine.dispose()

    def settings(self) -> Any:
        """The queue settings the stack's processes derive from their environment (store,
        Redis, queue prefix, deployment namespace), for producers and readers in this process."""
        from lmqueue.settings import Settings

        env = self.env
        return Settings(
            database_url=env["DATABASE_URL"],
            redis_url=self.redis_url,
            queue_prefix=self.queue_prefix,
            deployment=env.get("LMQUEUE_DEPLOYMENT", ""),
        )

    @property
    def key_prefix(self) -> str:
        """The stack's Redis namespace (every kombu key starts with it)."""
        return redis_key_prefix(self.settings())

    def purge_queues(self) -> None:
        r = redis.Redis.from_url(self.redis_url)
        for model in self.models:
            keys = redis_queue_keys(self.queue(model), self.key_prefix)
            r.delete(*keys)
        r.close()

    def queue(self, model: str) -> str:
        from lmqueue.settings import Settings

        return queue_name(model, Settings(queue_prefix=self.queue_prefix))

    # --- talking to it ------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    def submit(self, client: httpx.Client, model: str, prompt: str, **body: Any) -> str:
        resp = client.post("/v1/jobs", json=completion_job(model, prompt=prompt, **body))
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def wait_job(self, client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
            return job if job["status"] in TERMINAL else None

        return wait_until(done, timeout_s, f"job {job_id} to finish", every_s=0)  # type: ignore[no-any-return]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.database_url)
        return self._engine

    def jobs(self, ids: Iterable[str]) -> list[Job]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Job).where(Job.id.in_(list(ids)))))

    def count_open(self, ids: Iterable[str]) -> int:
        """Jobs among `ids` not yet finished (unknown ids count as open). A COUNT, not a load:
        a bench polls it while the worker computes on the same cores."""
        ids = list(ids)
        with Session(self.engine) as s:
            ended = s.scalar(
                select(func.count()).where(Job.id.in_(ids), Job.status.in_(list(TERMINAL)))
            )
        return len(ids) - int(ended or 0)

    def wait_jobs_done(
        self, ids: list[str], timeout_s: float = 300, every_s: float = 0.25
    ) -> list[Job]:
        try:
            wait_until(
                lambda: self.count_open(ids) == 0,
                timeout_s,
                f"{len(ids)} jobs to finish",
                every_s=every_s,
            )
            return self.jobs(ids)
        except TimeoutError as e:
            # A timeout in CI must tell its story: where each job stopped, and what the
            # processes said meanwhile.
            seen = {j.id: (j.status, j.task_id, j.enqueued_at, j.held_at) for j in self.jobs(ids)}
            raise TimeoutError(f"{e}\njobs: {seen}\n{self.all_logs()}") from None

    def worker_logs(self) -> str:
        return _tails(self.workers)

    def all_logs(self) -> str:
        return _tails([*self.workers, *self.schedulers])


def completion_job(model: str, **body: Any) -> dict[str, Any]:
    """A POST /v1/jobs body: a greedy completion unless `body` says otherwise."""
    return {"model": model, "endpoint": "/v1/completions", "body": {"temperature": 0, **body}}


def _tails(procs: Iterable[Proc]) -> str:
    return "\n\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)


@contextmanager
def running(stack: Stack, workers: Iterable[str] = ()) -> Iterator[Stack]:
    """Migrate, start the API (and workers for `workers`), and stop it all afterwards."""
    stack.migrate()
    try:
        stack.start_api()
        for model in workers:
            stack.start_worker(model)
        yield stack
    finally:
        stack.stop()
