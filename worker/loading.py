"""Load a registry `ModelSpec` into a ready `Engine`: tokenizer, model, device, dtype, context.

A local directory and a hub id go through the same `from_pretrained(spec.path)` calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmqueue.registry import ModelSpec
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
    """Explicit dtypes win; "auto" = float32 on CPU, bfloat16 on CUDA if supported else float16."""
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _quantization_kwargs(spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for `spec.quantization` (e.g. a `quantization_config`).

    The single place where quantization plugs in. Methods applied after loading (cpu-int8
    dynamic quantization) would return nothing here and get a post-load hook next to it.
    """
    if spec.quantization == "none":
        return {}
    raise ModelLoadError(
        spec, f"quantization {spec.quantization!r} is not implemented yet; use quantization='none'"
    )


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


def load_engine(spec: ModelSpec) -> Engine:
    """Load `spec` (tokenizer + causal LM) into an `Engine`; raises `ModelLoadError`."""
    if spec.path.startswith("echo:"):  # test-only null model (benchmarks of the queue path)
        from worker.echo import EchoEngine

        return EchoEngine(spec.name)
    if spec.task != "generate":
        raise ModelLoadError(spec, f"task {spec.task!r} is not served by the generation engine")
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    kwargs.update(_quantization_kwargs(spec, device))
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}  # load weights straight onto the GPU

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, trust_remote_code=spec.trust_remote_code
        )
        model: Any = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except Exception as exc:  # OSError (missing files/repo), ValueError (unknown arch), ...
        raise ModelLoadError(spec, f"{type(exc).__name__}: {exc}") from exc
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()

    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(spec, "the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    max_context = _max_context(spec, model.config, tokenizer)

    log.info(
        "loaded model %s from %s on %s (%s, max_context %d) in %.2fs",
        spec.name,
        spec.path,
        device,
        str(dtype).removeprefix("torch."),
        max_context,
        time.perf_counter() - started,
    )
    return Engine(model, tokenizer, device, max_context, name=spec.name)
