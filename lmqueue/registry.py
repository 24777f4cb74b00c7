"""The served-model registry, readable without torch (the API validates model names with it).

Sources, first match wins:
1. `LMQUEUE_MODELS_FILE` -> a TOML file with one `[models.NAME]` table per model;
2. `LMQUEUE_MODELS` -> "name=path_or_hub_id[,name2=...]" with default settings per model.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmqueue.schemas import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from lmqueue.settings import Settings, get_settings

Task = Literal["generate", "embed"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "bnb-int8", "bnb-nf4", "gptq", "cpu-int8"]
# Which continuous-batching engine runs a generation model: lmqueue's slot loop, or transformers'
# paged ContinuousBatchingManager (greedy decoding only; sliding-window models need it).
EngineKind = Literal["lmqueue", "hf-paged"]


class ModelSpec(BaseModel):
    """How one model is served. Quantization is always explicit, never guessed from a name."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")
    path: str  # local directory or hub id: both go through from_pretrained(path)
    task: Task = "generate"
    dtype: DType = "auto"
    quantization: Quantization = "none"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_context: int = Field(default=0, ge=0)  # 0 = the model config's max_position_embeddings
    engine: EngineKind = "lmqueue"
    max_batch_size: int = Field(default=0, ge=0)  # decode slots; 0 = the global setting
    max_batch_tokens: int = Field(default=0, ge=0)  # 0 = the global setting
    prefill_budget: int = Field(default=0, ge=0)  # prompt tokens per step; 0 = the global setting
    trust_remote_code: bool = False
    # Semantic cache (opt-in): the name of an embedding model served here that embeds this
    # model's prompts; a deterministic request whose prompt is this similar (cosine) to a cached
    # one, and passes the guards of lmqueue.semantic, gets its answer. "" = off.
    semantic_cache: str = ""
    semantic_threshold: float = Field(default=0.92, gt=0.0, le=1.0)
    # `lmqueue pool`: workers of this model that may share one GPU (small models); 1 = a GPU each.
    workers_per_gpu: int = Field(default=1, ge=1)

    def endpoints(self) -> tuple[str, ...]:
        if self.task == "embed":
            return (EMBEDDINGS,)
        return (COMPLETIONS, CHAT, RESPONSES)

    def batch_size(self, settings: Settings) -> int:
        return self.max_batch_size or settings.max_batch_size

    def prefill_tokens(self, settings: Settings) -> int:
        return self.prefill_budget or settings.prefill_budget

    def batch_tokens(self, settings: Settings) -> int:
        return self.max_batch_tokens or settings.max_batch_tokens


class RegistryError(ValueError):
    pass


def _from_file(path: Path) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read models file {path}: {exc}") from exc
    specs: dict[str, ModelSpec] = {}
    for name, table in (data.get("models") or {}).items():
        try:
            specs[name] = ModelSpec(name=name, **table)
        except (ValidationError, TypeError) as exc:
            raise RegistryError(f"{path}: model {name!r} is invalid: {exc}") from exc
    return specs


def _from_shortcut(value: str) -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RegistryError(f"LMQUEUE_MODELS entry {item!r} is not name=path")
        specs[name] = ModelSpec(name=name, path=path)
    return specs


def _check_semantic(specs: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """A semantic cache must name an embedding model served here."""
    for spec in specs.values():
        embedder = specs.get(spec.semantic_cache) if spec.semantic_cache else None
        if spec.semantic_cache and (embedder is None or embedder.task != "embed"):
            raise RegistryError(
                f"model {spec.name!r}: semantic_cache {spec.semantic_cache!r} must name an "
                'embedding model (task = "embed") of this registry'
            )
    return specs


def load_registry(settings: Settings) -> dict[str, ModelSpec]:
    if settings.models_file:
        return _check_semantic(_from_file(settings.models_file))
    return _from_shortcut(settings.models)


@lru_cache(maxsize=8)
def _cached(models_file: Path | None, models: str) -> dict[str, ModelSpec]:
    return load_registry(Settings(models_file=models_file, models=models))


def get_registry() -> dict[str, ModelSpec]:
    settings = get_settings()
    return _cached(settings.models_file, settings.models)


def get_model(name: str) -> ModelSpec:
    registry = get_registry()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise RegistryError(f"model {name!r} is not served here (served: {known})")
    return registry[name]
