"""Bad input gets a 4xx naming the field; never a 500. (Needs no worker.)"""

from __future__ import annotations

import pytest

from cli.stack import Stack

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("payload", "status", "names"),
    [
        ({"model": "tiny", "endpoint": "/v1/nope", "body": {"prompt": "x"}}, 400, "endpoint"),
        ({"model": "nope", "endpoint": "/v1/completions", "body": {"prompt": "x"}}, 400, "model"),
        (
            {
                "model": "tiny",
                "endpoint": "/v1/completions",
                "body": {"prompt": "x", "max_tokens": -1},
            },
            400,
            "body.max_tokens",
        ),
        (
            {
                "model": "tiny",
                "endpoint": "/v1/completions",
                "body": {"prompt": "x", "temperature": "hot"},
            },
            400,
            "body.temperature",
        ),
        ({"model": "tiny", "endpoint": "/v1/completions", "body": {}}, 400, "body.prompt"),
        (
            {"model": "tiny", "endpoint": "/v1/chat/completions", "body": {"messages": []}},
            400,
            "body.messages",
        ),
        (
            {"model": "tiny", "endpoint": "/v1/completions", "body": {"prompt": "x", "n": 99}},
            400,
            "body.n",
        ),
        (
            {
                "model": "tiny",
                "endpoint": "/v1/completions",
                "body": {"prompt": "x", "tmeperature": 1},
            },
            400,
            "body.tmeperature",
        ),
        (
            {
                "model": "tiny",
                "endpoint": "/v1/completions",
                "body": {"prompt": "x"},
                "priority": 99,
            },
            400,
            "priority",
        ),
        ({"endpoint": "/v1/completions", "body": {"prompt": "x"}}, 400, "model"),
    ],
)
def test_bad_requests_name_the_field(stack: Stack, payload: dict, status: int, names: str) -> None:
    with stack.client() as client:
        resp = client.post("/v1/jobs", json=payload)
    assert resp.status_code == status, resp.text
    assert names in resp.json()["error"]["message"]


def test_malformed_json_is_a_400(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.post(
            "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["message"]


def test_unknown_job_is_404(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.get("/v1/jobs/job_000")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
