"""A worker whose model cannot be served exits non-zero at start, naming the model and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.procs import wait_until
from cli.stack import Stack

pytestmark = pytest.mark.timeout(120)


def start_and_wait_exit(stack: Stack, model: str) -> tuple[int, str]:
    proc = stack.start_worker(model, concurrency=1, wait_ready=False)
    wait_until(lambda: not proc.alive(), 90, f"the worker for {model!r} to exit")
    code = proc.popen.returncode
    log = proc.log_path.read_text(errors="replace")
    proc.stop()
    return code, log


def test_bad_model_path_stops_the_worker(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-model-here"
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    stack = Stack(
        f"sqlite:///{tmp_path / 'lmqueue.db'}",
        redis_url,
        {"gone": missing, "hollow": not_a_model, "tiny": tiny_model_dir},
        tmp_path,
    )
    try:
        code, log = start_and_wait_exit(stack, "gone")
        assert code != 0
        assert f"lmqueue worker: cannot load model 'gone' from '{missing}'" in log
        assert "no such file or directory" in log
        assert "ready." not in log  # it never consumed anything

        code, log = start_and_wait_exit(stack, "hollow")
        assert code != 0
        assert f"lmqueue worker: cannot load model 'hollow' from '{not_a_model}'" in log

        code, log = start_and_wait_exit(stack, "unknown")  # not in the registry at all
        assert code != 0
        assert "model 'unknown' is not served here" in log
    finally:
        stack.stop()
