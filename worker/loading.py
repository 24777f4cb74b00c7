"""Load a registry `ModelSpec` into a ready engine: tokenizer, model, device, dtype,
quantization (`worker.quantization`), context length.

A local directory and a hub id go through the same `from_pretrained(spec.path)` calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmqueue.registry import ModelSpec
from worker import quantization
from worker.embedding import EmbedEngine
from worker.engine import Engine

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModelLoadError(Exception):
    """A model cannot be served as configured; the message names the model and its path."""

    def __init__(self, spec: ModelSpec, reason: str):
        super().__init__(f"cannot load model {spec.name!r} from {spec.path!r}: {reason}")
        self.model = spec.name
        self.path = spec.path
        self.reason = reason


def resolve_device(spec: ModelSpec) -> torch.device:
    """The torch device for `spec.device`: "auto" = cuda if available, else cpu."""
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.device)
    except RuntimeError as exc:
        raise ModelLoadError(spec, f"invalid device {spec.device!r}: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                spec, f"device {spec.device!r} requested but CUDA is not available"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                spec,
                f"device {spec.device!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible",
            )
    return device


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """Explicit dtypes win; "auto" = float32 on CPU, bfloat16 on CUDA if supported else float16
    (float16 for GPTQ checkpoints: their fast CUDA kernels are written for it)."""
    if spec.dtype != "auto":
        dtype = _DTYPES[spec.dtype]
        if device.type == "cpu" and dtype == torch.float16:
            log.warning("model %s: float16 on CPU runs without fast kernels (slow)", spec.name)
        return dtype
    if device.type == "cuda":
        if spec.quantization == "gptq" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return torch.float32


def _max_context(spec: ModelSpec, config: Any, tokenizer: Any) -> int:
    config_max = getattr(config, "max_position_embeddings", None)
    if spec.max_context:
        if isinstance(config_max, int) and spec.max_context > config_max:
            log.warning(
                "model %s: max_context %d exceeds the config's max_position_embeddings %d",
                spec.name,
                spec.max_context,
                config_max,
            )
        return spec.max_context
    if isinstance(config_max, int) and config_max > 0:
        return config_max
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # HF uses ~1e30 for "unknown"
        return tok_max
    raise ModelLoadError(
        spec, "the model config has no max_position_embeddings; set max_context in the registry"
    )


EngineFactory = Callable[[ModelSpec], Engine | EmbedEngine]
_engine_factory: EngineFactory | None = None


def set_engine_factory(factory: EngineFactory | None) -> None:
    """Serve every model with `factory(spec)` instead of loading weights. Only benchmarks and
    tests call this, in a worker process they start through their own entry module; nothing in
    settings or the registry can select it."""
    global _engine_factory
    _engine_factory = factory


def load_engine(spec: ModelSpec) -> Engine | EmbedEngine:
    """Load `spec` into an engine: an `Engine` (causal LM) for task "generate", an
    `EmbedEngine` (encoder, mean pooling) for task "embed". Raises `ModelLoadError`."""
    if _engine_factory is not None:
        return _engine_factory(spec)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    started = time.perf_counter()
    tokenizer, model = _load_weights(spec, device, dtype)
    max_context = _max_context(spec, model.config, tokenizer)
    log.info(
        "loaded model %s (%s) from %s on %s (%s, quantization %s: %s; max_context %d) in %.2fs",
        spec.name,
        spec.task,
        spec.path,
        device,
        str(dtype).removeprefix("torch."),
        spec.quantization,
        quantization.describe(model),
        max_context,
        time.perf_counter() - started,
    )
    if spec.task == "embed":
        return EmbedEngine(model, tokenizer, device, max_context, name=spec.name)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(spec, "the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return Engine(model, tokenizer, device, max_context, name=spec.name)


def _load_weights(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode on `device`), quantized as `spec.quantization` says."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if spec.path.startswith(("/", "./", "../", "~")) and not Path(spec.path).expanduser().exists():
        raise ModelLoadError(spec, "no such file or directory")  # not a hub id: say so plainly
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    try:
        quantization.check_device(spec.quantization, device, dtype)
        kwargs.update(quantization.load_kwargs(spec.quantization, spec.path, device, dtype))
    except (quantization.QuantizationError, OSError, ValueError) as exc:
        raise ModelLoadError(spec, str(exc)) from exc
    # Quantized weights cannot be moved with .to() after loading: place them while loading.
    if device.type == "cuda" or spec.quantization != "none":
        kwargs["device_map"] = {"": device}
    auto = AutoModel if spec.task == "embed" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, trust_remote_code=spec.trust_remote_code
        )
        model: Any = auto.from_pretrained(spec.path, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        model = quantization.after_load(spec.quantization, model)
    except Exception as exc:  # OSError (missing files/repo), ValueError (unknown arch), ...
        raise ModelLoadError(spec, f"{type(exc).__name__}: {exc}") from exc
    return tokenizer, model.eval()
