"""Quantized loading, chosen by `ModelSpec.quantization` (never guessed from a file name).

Two hooks, both called by `worker.loading`:

- `load_kwargs(method, path, device, dtype)`: extra `from_pretrained` kwargs (a
  `quantization_config` for bitsandbytes; a check that a GPTQ checkpoint really is one);
- `after_load(method, model)`: methods applied to a loaded float model (cpu-int8).

| method   | how                                       | where it runs                           |
|----------|-------------------------------------------|-----------------------------------------|
| bnb-int8 | `BitsAndBytesConfig(load_in_8bit=True)`   | CUDA; CPU works with bitsandbytes       |
|          |                                           | 0.50 (0.75x float32 on the bench model) |
| bnb-nf4  | `BitsAndBytesConfig(load_in_4bit, nf4)`   | CUDA; CPU works (1.3x float32 there)    |
| gptq     | the checkpoint's own `quantization_config`| CUDA (fast kernels) and CPU (torch      |
|          | (transformers + optimum + gptqmodel)      | kernels); needs `pip install .[gptq]`   |
| cpu-int8 | `torch.ao.quantization.quantize_dynamic`  | CPU only: int8 weights, int8 dynamic    |
|          | on every `nn.Linear`                      | activations (2.5x float32 there)        |

float16 / bfloat16 are dtypes (`ModelSpec.dtype`), not quantization methods.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BNB_METHODS = ("bnb-int8", "bnb-nf4")


class QuantizationError(Exception):
    """A quantization method cannot be used as configured (the loader adds model and path)."""


def _require(packages: tuple[str, ...], method: str, extra: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise QuantizationError(
            f"quantization {method!r} needs the Python package(s) {', '.join(missing)}; "
            f"install them with: pip install 'lmqueue[{extra}]'"
        )


def checkpoint_quant_method(path: str) -> str | None:
    """`quantization_config.quant_method` from a checkpoint's config.json, if it has one.

    Reads a local directory directly; for a hub id it goes through `AutoConfig` (cache/offline
    rules apply). Returns None when the checkpoint is not quantized.
    """
    local = Path(path) / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path).to_dict()
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method).lower() if method else None


def load_kwargs(method: str, path: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for `method` ("none" -> {})."""
    if method in ("none", "cpu-int8"):
        return {}
    if method in BNB_METHODS:
        return {"quantization_config": _bnb_config(method, dtype)}
    if method == "gptq":
        _require(("optimum", "gptqmodel"), method, "gptq")
        found = checkpoint_quant_method(path)
        if found != "gptq":
            raise QuantizationError(
                "quantization 'gptq' needs a GPTQ-quantized checkpoint (config.json "
                f"quantization_config.quant_method = 'gptq'); this one has {found or 'none'}"
            )
        return {}  # from_pretrained reads the checkpoint's own quantization_config
    raise QuantizationError(f"unknown quantization {method!r}")


def _bnb_config(method: str, dtype: torch.dtype) -> Any:
    _require(("bitsandbytes",), method, "quant")
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        _quiet_bnb_int8_cast_warning()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,  # matmuls run in the model's dtype
    )


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def _quiet_bnb_int8_cast_warning() -> None:
    # LLM.int8 quantizes activations from float16; bitsandbytes logs a warning on EVERY matmul
    # whose input is float32/bfloat16 (hundreds per generated token). It is expected here.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in logger.filters):
        logger.addFilter(_DropCastWarning())


def check_device(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Reject combinations that cannot work, before any weights are read."""
    if method == "cpu-int8":
        if device.type != "cpu":
            raise QuantizationError(
                f"quantization 'cpu-int8' runs on the CPU only (device is {device})"
            )
        if dtype != torch.float32:
            raise QuantizationError(
                "quantization 'cpu-int8' quantizes float32 weights; set dtype to 'auto' or "
                "'float32'"
            )


def after_load(method: str, model: Any) -> Any:
    """Post-load quantization (cpu-int8); other methods return the model unchanged."""
    if method != "cpu-int8":
        return model
    from torch.ao.quantization import quantize_dynamic

    # torch.ao's eager quantization is deprecated in favour of torchao, but it is the one int8
    # path with fast CPU kernels that needs no compiler; silence its deprecation notices.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def describe(model: Any) -> str:
    """A short description of how the model's linear layers are stored (for logs and tests)."""
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    return ", ".join(kinds)
