"""The generation engine: one loaded causal LM, its tokenizer, and the model calls the slot loop
makes (gpt-fast style: small and explicit, tensor shapes in comments).

It does not use `model.generate`, so each row keeps its own sampling parameters (temperature,
top-p, seed), stop strings and token budget, and rows join and leave the running batch at every
step (`worker.slot_engine`). `generate()` is the static policy of earlier versions, kept for the
comparison in bench/engine.py and for callers with a fixed list of requests: every request is
admitted at once and the batch runs until its last row finishes.

What keeps a step cheap without changing any output:
- prompts of very different lengths are prefilled in length groups (little padding computed)
  and a prefix shared by rows admitted together is computed once (`worker.prefill`);
- the KV cache lives in preallocated slot buffers, not concatenated every step
  (`worker.kv_slots`, `worker.kv_cache`).

Shapes: B = rows, T = padded prompt length, S = cached length, V = vocabulary size.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from worker.gen_types import GenRequest, GenResult, Outcome, RequestError, TokenEvent
from worker.kv_cache import supports_buffered
from worker.packed import supports_packing
from worker.prefill import PrefixPolicy, PrefixStore
from worker.prompts import PromptEncoder
from worker.slot_engine import SlotEngine
from worker.structured import Grammars

__all__ = [
    "Engine",
    "EngineStats",
    "GenRequest",
    "GenResult",
    "PrefixPolicy",
    "RequestError",
    "TokenEvent",
]

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since the engine started (read by the metrics exporter; one writer thread)."""

    batches: int = 0  # static generate() calls that ran at least one row
    rows: int = 0
    prompt_tokens: int = 0  # real prompt tokens of those rows
    prefill_tokens: int = 0  # token positions the prefill computed (real + padding)
    prefix_hits: int = 0  # prefill groups that reused a shared prefix's KV
    prefix_rows: int = 0  # rows in those groups
    prefix_tokens_saved: int = 0  # prefill positions not computed thanks to the reuse
    oom_splits: int = 0  # forwards that ran out of device memory (split or preempted)
    packed_steps: int = 0  # steps that decoded and prefilled in one forward (worker.packed)


class Engine(PromptEncoder):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        max_context: int,
        name: str = "",
        prefix_policy: PrefixPolicy | None = None,
        prefill_max_waste: float = 0.1,
    ):
        super().__init__(tokenizer, name)
        self.model = model
        self.device = torch.device(device)
        self.max_context = max_context
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids, default=0)
        self.n_embeddings: int = model.get_input_embeddings().weight.shape[0]
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x names the cache argument `cache`; `past_key_values` is deprecated
        # (removed in 5.40) but is the only name older releases and remote-code models know.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.prefix_policy = prefix_policy or PrefixPolicy()
        self.prefixes = PrefixStore()
        # Prefill in length groups whose padding stays under this fraction (1.0 = one group).
        self.prefill_max_waste = prefill_max_waste
        # Plain full-attention layers only: slot buffers and merged prefill groups need them.
        self.kv_buffers = supports_buffered(model.config)
        # Admitting steps run decode and prefill as one packed forward (worker.packed).
        self.packed_steps = self.kv_buffers and self._logits_to_keep and supports_packing(model)
        self.stats = EngineStats()
        self._grammars: Grammars | None = None

    # ---- requests -----------------------------------------------------------------------

    def check(self, req: GenRequest) -> RequestError | None:
        """A request this model can never run (400-style), or None."""
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            return RequestError("empty_prompt", "the prompt has no tokens", "prompt")
        if req.max_tokens < 1:
            return RequestError("invalid_value", "max_tokens must be at least 1", "max_tokens")
        if req.temperature < 0:
            return RequestError("invalid_value", "temperature must be >= 0", "temperature")
        if not 0 < req.top_p <= 1:
            return RequestError("invalid_value", "top_p must be in (0, 1]", "top_p")
        if n_prompt + req.max_tokens > self.max_context:
            return RequestError(
                "context_length_exceeded",
                f"This model's maximum context length is {self.max_context} tokens; the request "
                f"needs {n_prompt} prompt + {req.max_tokens} completion tokens",
                "prompt" if n_prompt >= self.max_context else "max_tokens",
            )
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.n_embeddings:
            return RequestError("invalid_prompt", "the prompt has out-of-vocabulary ids", "prompt")
        if req.logit_bias and max(req.logit_bias) >= self.n_embeddings:
            return RequestError(
                "invalid_value",
                f"logit_bias: token id {max(req.logit_bias)} is outside the model's vocabulary "
                f"(0..{self.n_embeddings - 1})",
                "logit_bias",
            )
        return None

    def compile_grammar(self, key: str) -> Any:
        """The compiled grammar of a structured-output request (cached per schema)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.n_embeddings, self.eos_ids)
        return self._grammars.compile(key)

    def slots(self, slots: int, prefill_budget: int, admit_batch: int = 0) -> SlotEngine:
        """A continuous-batching loop over this model (one per worker process)."""
        if not self.kv_buffers:
            raise RuntimeError(
                f"model {self.name!r} has cache layers other than full attention (sliding window, "
                'linear attention); the slot loop needs plain layers: use engine = "hf-paged"'
            )
        return SlotEngine(self, slots, prefill_budget, admit_batch)

    def generate(self, requests: list[GenRequest]) -> list[Outcome]:
        """The static policy: all requests admitted at once, run until the last finishes.

        A request that can never run (context too long, empty prompt) gets its RequestError and
        the others still run. Device errors other than out of memory propagate."""
        loop = self.slots(max(1, sum(max(1, r.n) for r in requests)), prefill_budget=1 << 62)
        results: dict[str, Outcome] = {}
        for i, req in enumerate(requests):
            err = loop.admit(str(i), req)
            if err is not None:
                results[str(i)] = err
        if not loop.idle():
            self.stats.batches += 1
            self.stats.rows += len(loop.waiting)
            self.stats.prompt_tokens += sum(len(r.req.prompt_ids) for r in loop.waiting)
        while not loop.idle():
            results.update(loop.step().finished)
        return [results[str(i)] for i in range(len(requests))]

    # ---- model calls --------------------------------------------------------------------

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        # ids, pos: [B, q]; mask: [B, S] covering the cache and the q new tokens -> [B, V] fp32
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        kwargs[self._cache_arg] = cache
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs
        )
        return out.logits[:, -1, :].float()

    def forward_packed(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: DynamicCache, keep: torch.Tensor
    ) -> torch.Tensor:
        # ids, pos: [1, N] packed tokens (worker.packed); keep: [K] positions -> [K, V] fp32
        kwargs: dict[str, Any] = {self._cache_arg: cache, "logits_to_keep": keep}
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **kwargs)
        return out.logits[0].float()

    def left_pad(self, seqs: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T] 1 = real token
        for b, seq in enumerate(seqs):
            ids[b, T - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[b, T - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def decode_text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return ids
