"""The exact result cache, end to end (API + real worker + real tiny model, auth on so two
tenants exist), and its key's parts: model revision, canonical body, TTL and size bound."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cli.stack import Stack, running
from lmqueue import revision
from lmqueue.registry import ModelSpec
from lmqueue.tables import Base, Job, JobStatus
from tests.auth_stack import as_key, auth_stack, create_key
from tests.batch_client import content_lines, create, line, wait_done

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cache_stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, dict[str, str]]]:
    st = auth_stack(
        database_url,
        redis_url,
        tiny_model_dir,
        tmp_path_factory.mktemp("cache"),
        LMQUEUE_CACHE_ENABLED="true",
        LMQUEUE_WEBHOOK_ALLOW_PRIVATE_TARGETS="true",
    )
    with running(st, ("tiny",)):
        keys = {n: create_key(st, n) for n in ("alice", "bob")}
        keys["admin"] = create_key(st, "ops", admin=True)
        yield st, keys


def submit(client: httpx.Client, prompt: str, cache: bool = True, **body: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "endpoint": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": 6, "temperature": 0, **body},
            "cache": cache,
        },
    )
    assert resp.status_code == 202, resp.text
    out: dict[str, Any] = resp.json()
    return out


def computed(st: Stack, client: httpx.Client, prompt: str, **body: Any) -> dict[str, Any]:
    job = st.wait_job(client, submit(client, prompt, **body)["id"])
    assert job["status"] == "succeeded" and job["cached"] is False, job
    return job


def test_deterministic_repeat_is_answered_at_submit(
    cache_stack: tuple[Stack, dict[str, str]],
) -> None:
    st, keys = cache_stack
    with as_key(st, keys["alice"]) as client:
        first = computed(st, client, "def cached_one():")
        t0 = time.perf_counter()
        hit = submit(client, "def cached_one():", top_p=1.0, stop=None)  # defaults spelled out
        took = time.perf_counter() - t0
        assert hit["status"] == "succeeded" and hit["cached"] is True, hit
        assert hit["cache"] == {"job_id": first["id"], "kind": "exact"}
        assert hit["response"]["choices"] == first["response"]["choices"]
        usage = hit["response"]["usage"]  # the whole prompt was served, none of it computed
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] > 0
        assert first["response"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert "microbatch" not in hit  # no worker ran it
        print(f"cache hit answered in {took * 1000:.1f} ms")
        # Anything that changes the answer misses: another max_tokens, another stop.
        assert submit(client, "def cached_one():", max_tokens=5)["cached"] is False
        assert submit(client, "def cached_one():", stop=["\n"])["cached"] is False
        # cache: false opts out (and the job really runs).
        opted = submit(client, "def cached_one():", cache=False)
        assert opted["cached"] is False
        assert st.wait_job(client, opted["id"])["cached"] is False


def test_sampled_requests_are_never_cached_seeded_ones_are(
    cache_stack: tuple[Stack, dict[str, str]],
) -> None:
    st, keys = cache_stack
    with as_key(st, keys["alice"]) as client:
        computed(st, client, "def sampled():", temperature=0.9)
        assert submit(client, "def sampled():", temperature=0.9)["cached"] is False
        seeded = computed(st, client, "def seeded():", temperature=0.9, seed=7)
        again = submit(client, "def seeded():", temperature=0.9, seed=7)
        assert again["cached"] is True
        assert again["response"]["choices"] == seeded["response"]["choices"]
        assert submit(client, "def seeded():", temperature=0.9, seed=8)["cached"] is False


def test_never_a_hit_across_tenants(cache_stack: tuple[Stack, dict[str, str]]) -> None:
    st, keys = cache_stack
    with as_key(st, keys["alice"]) as alice, as_key(st, keys["bob"]) as bob:
        computed(st, alice, "def secret_of_alice():")
        assert submit(alice, "def secret_of_alice():")["cached"] is True
        assert submit(bob, "def secret_of_alice():")["cached"] is False


def test_identical_batch_lines_are_computed_once(cache_stack: tuple[Stack, dict[str, str]]) -> None:
    from openai import OpenAI

    st, keys = cache_stack
    with as_key(st, keys["alice"]) as client:
        single = computed(st, client, "def earlier():", max_tokens=3)
    oa = OpenAI(base_url=f"{st.base_url}/v1", api_key=keys["alice"], max_retries=0)
    lines = [line(f"dup{i}", prompt="def twice():") for i in range(4)]
    lines += [line("other", prompt="def other():"), line("earlier", prompt="def earlier():")]
    batch = create(oa, lines)
    done = wait_done(oa, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6, done
    out = {x["custom_id"]: x["response"]["body"] for x in content_lines(oa, done.output_file_id)}
    assert len({json.dumps(out[f"dup{i}"]["choices"]) for i in range(4)}) == 1
    assert out["earlier"]["choices"] == single["response"]["choices"]
    # Copies report their prompt as cached (not computed); the line that ran does not.
    cached = {c: body["usage"]["prompt_tokens_details"]["cached_tokens"] for c, body in out.items()}
    prompt = {c: body["usage"]["prompt_tokens"] for c, body in out.items()}
    assert cached["dup0"] == cached["other"] == 0
    assert all(cached[c] == prompt[c] > 0 for c in ("dup1", "dup2", "dup3", "earlier"))
    with Session(create_engine(st.database_url)) as session:
        jobs = {
            j.custom_id: j for j in session.scalars(select(Job).where(Job.batch_id == batch.id))
        }
    ran = [c for c, j in jobs.items() if j.attempts > 0]
    assert sorted(ran) == ["dup0", "other"]  # the other 4 lines were never sent to a worker
    assert jobs["earlier"].cache_of == single["id"]
    assert {jobs[f"dup{i}"].cache_of for i in (1, 2, 3)} == {jobs["dup0"].id}
    with st.client(headers={"Authorization": f"Bearer {keys['admin']}"}) as admin:
        metrics = admin.get("/metrics").text
    hits = [x for x in metrics.splitlines() if x.startswith("lmqueue_cache_lookups_total{")]
    assert any('result="hit"' in x and not x.endswith(" 0.0") for x in hits), hits
    assert any('result="miss"' in x for x in hits), hits


def test_webhook_endpoints_belong_to_their_key(cache_stack: tuple[Stack, dict[str, str]]) -> None:
    """(Here because this stack has two tenants.) Another key neither sees nor manages them."""
    st, keys = cache_stack
    with as_key(st, keys["alice"]) as alice, as_key(st, keys["bob"]) as bob:
        ep = alice.post("/v1/webhook_endpoints", json={"url": "http://127.0.0.1:9/x"}).json()
        assert bob.get(f"/v1/webhook_endpoints/{ep['id']}").status_code == 404
        assert bob.get(f"/v1/webhook_endpoints/{ep['id']}/deliveries").status_code == 404
        assert bob.post(f"/v1/webhook_endpoints/{ep['id']}/rotate_secret").status_code == 404
        assert bob.delete(f"/v1/webhook_endpoints/{ep['id']}").status_code == 404
        assert ep["id"] not in [e["id"] for e in bob.get("/v1/webhook_endpoints").json()["data"]]
        assert alice.delete(f"/v1/webhook_endpoints/{ep['id']}").json()["deleted"] is True


# --- the key's parts, without a stack ----------------------------------------------------------


def test_revision_changes_with_weights_quantization_and_chat_template(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    spec = ModelSpec(name="rev-test", path=str(model))

    def rev(s: ModelSpec) -> str:
        revision._cache.clear()
        return revision.model_revision(s)

    base = rev(spec)
    assert rev(spec) == base
    assert rev(spec.model_copy(update={"quantization": "cpu-int8"})) != base
    config = model / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = "{{ messages[0]['content'] }}"
    config.write_text(json.dumps(data))
    templated = rev(spec)
    assert templated != base
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert rev(spec) != templated


def test_prune_applies_ttl_and_size_bound(tmp_path: Path) -> None:
    from lmqueue import cache
    from lmqueue.settings import Settings

    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(engine)
    t = time.time()
    with Session(engine) as session:
        for i, age in enumerate([10_000, 30, 20, 10]):
            session.add(
                Job(
                    id=f"job_{i}",
                    owner="k",
                    model="m",
                    endpoint="/v1/completions",
                    body={},
                    status=JobStatus.SUCCEEDED,
                    finished_at=t - age,
                    cache_key=f"key{i}",
                )
            )
        session.commit()
        s = Settings(cache_ttl_s=3600, cache_max_entries=2)
        assert cache.prune(session, s, t) == 2  # one expired, then the oldest beyond two
        session.commit()
        left = session.scalars(select(Job.id).where(Job.cache_key.is_not(None))).all()
        assert sorted(left) == ["job_2", "job_3"]
        assert cache.lookup(session, "k", "key3", s) is not None
        assert cache.lookup(session, "other", "key3", s) is None
