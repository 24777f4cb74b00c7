"""One forward for a step that both decodes the live rows and prefills the rows it admits.

Without it an admitting step runs two forwards: a prefill of the admitted prompts, then a decode
of the live rows. On CPU a decode forward of 32 rows costs about what a prefill of 80 tokens
does (the matmuls at M = 32 run far below their large-M rate, and every forward reads all the
weights once), so the slot loop paid one extra weight pass per admission. Here the step's
tokens are packed into one sequence `[1, N]` (the n live rows' next tokens first, then each
admitted prompt in turn), so every projection and MLP runs once as an `[N, hidden]` matmul;
only attention is per part:
- the n decode tokens attend over their slot rows (written at column `end`, as a decode does);
- each prompt attends causally over itself (no padding: its real tokens only).

The model runs unmodified: its attention modules look the attention function up by name
(`config._attn_implementation`), and this registers one that reads the step's layout; the
mask machinery is skipped for unknown names, and the cache passed in routes each layer's new
keys/values (`PackedCache.update`). Only model types whose attention is plain scaled dot
product over `cache.update`'s output are packed (`PACKED_MODEL_TYPES`).
Shapes: N = packed tokens, n = live rows, H / Hkv = query / KV heads, D = head size,
W = the slot window, V = vocabulary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

from worker.kv_slots import SlotCache

if TYPE_CHECKING:
    from worker.engine import Engine

ATTENTION = "lmqueue_packed"
# Decoders whose attention is q/k/v projections + rotary + SDPA over cache.update's output,
# with no sliding window, soft-capping or sinks (those change the attention itself).
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "granite"})

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [Hkv, L, D]


def supports_packing(model: Any) -> bool:
    cfg = model.config
    return (
        getattr(cfg, "model_type", "") in PACKED_MODEL_TYPES
        and not getattr(cfg, "sliding_window", None)
        and not getattr(cfg, "use_sliding_window", False)
    )


@dataclass
class _Layout:
    n: int  # decode rows, packed first
    spans: list[tuple[int, int]]  # each prompt's [start, end) in the packed sequence
    slots: SlotCache
    decode_mask: torch.Tensor | None  # [n, 1, 1, W + 1] bool, True = attend
    windows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_active = threading.local()  # .layout: the forward in progress on this thread


class PackedCache(DynamicCache):
    """Routes each layer's new keys/values: the decode tokens' into the slot rows, the
    prompts' kept for attention and for joining the slots afterwards."""

    def __init__(self, config: Any, layout: _Layout):
        super().__init__(config=config)
        self.layout = layout

    def update(  # type: ignore[override]
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # keys, values: [1, Hkv, N, D]
        lay = self.layout
        n = lay.n
        if n:
            kd = keys[0, :, :n].transpose(0, 1)[:, :, None]  # [n, Hkv, 1, D]
            vd = values[0, :, :n].transpose(0, 1)[:, :, None]
            lay.windows[layer_idx] = lay.slots.layers[layer_idx].update(kd, vd)  # [n, Hkv, W+1, D]
        lay.prompt_kv[layer_idx] = (keys[0, :, n:], values[0, :, n:])  # [Hkv, N - n, D]
        return keys, values


def _packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    # query [1, H, N, D], key/value [1, Hkv, N, D] -> [1, N, H, D]
    lay: _Layout = _active.layout
    gqa = query.shape[1] != key.shape[1]
    parts = []
    if lay.n:
        qd = query[0, :, : lay.n].transpose(0, 1)[:, :, None]  # [n, H, 1, D]
        kw, vw = lay.windows[module.layer_idx]  # [n, Hkv, W + 1, D]
        o = F.scaled_dot_product_attention(
            qd, kw, vw, attn_mask=lay.decode_mask, scale=scaling, enable_gqa=gqa
        )  # [n, H, 1, D]
        parts.append(o[:, :, 0])  # [n, H, D]
    for a, z in lay.spans:
        o = F.scaled_dot_product_attention(
            query[:, :, a:z],
            key[:, :, a:z],
            value[:, :, a:z],
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )  # [1, H, L, D]
        parts.append(o[0].transpose(0, 1))  # [L, H, D]
    return torch.cat(parts)[None], None


AttentionInterface.register(ATTENTION, _packed_attention)


@dataclass
class PackedOut:
    logits: torch.Tensor  # [n + m, V] fp32: the decode rows', then each prompt's last token
    kv: list[KV]  # per prompt: its KV per layer [Hkv, L, D]


def packed_forward(
    engine: Engine, slots: SlotCache, last_tokens: list[int], prompts: list[list[int]]
) -> PackedOut:
    """Decode the n live rows (`last_tokens`, slot rows 0..n-1) and prefill `prompts`, in one
    forward. The caller reserved one column and advances the slots after."""
    dev, n = engine.device, len(last_tokens)
    spans, pos = [], list(slots.geo.lens[:n])  # decode rows continue at their lengths
    at = n
    for p in prompts:
        spans.append((at, at + len(p)))
        pos += range(len(p))
        at += len(p)
    ids = torch.tensor([last_tokens + [t for p in prompts for t in p]], device=dev)  # [1, N]
    keep = torch.tensor(list(range(n)) + [z - 1 for _, z in spans], device=dev)  # [n + m]
    mask = None
    if n:
        m, _ = slots.mask_and_positions(1, dev)  # [n, W + 1]
        mask = m.bool()[:, None, None, :]  # [n, 1, 1, W + 1]
    layout = _Layout(n, spans, slots, mask)
    cfg = engine.model.config
    saved, cfg._attn_implementation = cfg._attn_implementation, ATTENTION
    _active.layout = layout
    try:
        logits = engine.forward_packed(
            ids, torch.tensor([pos], device=dev), PackedCache(cfg, layout), keep
        )  # [n + m, V]
    finally:
        cfg._attn_implementation = saved
        _active.layout = None
    kvs = []
    for a, z in spans:
        kvs.append(
            [
                (layout.prompt_kv[i][0][:, a - n : z - n], layout.prompt_kv[i][1][:, a - n : z - n])
                for i in range(len(slots.layers))
            ]
        )
    return PackedOut(logits, kvs)
