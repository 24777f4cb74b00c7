"""Every error object lmqueue stores or answers has OpenAI's four keys (lmqueue.errors)."""

from __future__ import annotations

from typing import Any

import pytest

from lmqueue import errors

OPENAI_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "error",
    [
        errors.error_object("bad", code="invalid_value"),
        errors.error_body("bad")["error"],
        errors.request_error("too_long", "the prompt is too long", "prompt"),
        errors.server_error("engine_error", "boom"),
        errors.timeout_error(),
        errors.crashed_error(3),
        errors.cancelled_error(),
        errors.cancelled_error("batch_expired"),
    ],
)
def test_error_objects_have_openais_keys(error: dict[str, Any]) -> None:
    assert set(error) >= OPENAI_KEYS
    assert set(error) - OPENAI_KEYS <= {"status_code"}  # a job's HTTP-like status, nothing else
    assert isinstance(error["message"], str) and error["message"]


def test_job_errors_carry_the_status_their_batch_line_reports() -> None:
    assert errors.request_error("x", "m")["status_code"] == 400
    assert errors.server_error("x", "m")["status_code"] == 500
    assert errors.timeout_error()["status_code"] == 408


def test_pydantic_errors_name_each_field() -> None:
    raw = [{"loc": ("body", "max_tokens"), "msg": "too big"}, {"loc": ("n",), "msg": "bad"}]
    assert errors.describe_validation(raw, "body") == (
        "body.max_tokens: too big; body.n: bad",
        "body.max_tokens",
    )
