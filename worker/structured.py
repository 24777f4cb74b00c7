"""Structured output: `response_format` json_object / json_schema through constrained decoding
with xgrammar (CPU and CUDA). A schema is compiled once per engine (cached by its canonical JSON,
in the task thread that prepares the request); each row has its own matcher, and a step fills
every constrained row's bitmask and applies them all to the batch's logits in one call."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from worker.gen_types import RequestError

CACHE_SIZE = 64  # compiled grammars kept per engine


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # task threads prepare requests concurrently
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics
        self._control: torch.Tensor | None = None

    def compile(self, key: str, param: str = "response_format") -> Constraint:
        """The compiled grammar of a grammar key (lmqueue.formats.grammar_key)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._get_compiler(param)
            try:
                # json_object is any JSON object (as OpenAI's); no free whitespace: the output
                # is compact JSON, and a sampler cannot wander in indentation.
                schema = '{"type":"object"}' if key == "json" else key
                grammar = compiler.compile_json_schema(schema, any_whitespace=False)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError on bad schemas
                raise RequestError(
                    "invalid_schema", f"the JSON schema cannot be compiled: {exc}", param
                ) from exc
            self.compiled += 1
            grammar = Constraint(grammar, self.control_tokens())
            self._cache[key] = grammar
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return grammar

    def _get_compiler(self, param: str) -> Any:
        if self._compiler is None:
            try:
                import xgrammar as xgr
            except ImportError as exc:
                raise RequestError(
                    "unsupported_parameter",
                    "structured output needs the `structured` extra (xgrammar) on the worker",
                    param,
                ) from exc
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def control_tokens(self) -> torch.Tensor:
        """[V] bool: tokens whose text holds a control character. xgrammar lets raw control
        characters into JSON strings, which strict JSON parsers refuse; with no free whitespace
        no constrained output needs them, so they are masked too."""
        if self._control is None:
            texts = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
            bad = torch.zeros(self.vocab_size, dtype=torch.bool)
            for i, text in enumerate(texts[: self.vocab_size]):
                bad[i] = i not in self.stop_ids and any(ord(c) < 0x20 for c in text)
            self._control = bad
        return self._control


@dataclass(frozen=True)
class Constraint:
    """What a structured-output request carries (GenRequest.grammar)."""

    compiled: Any  # xgrammar.CompiledGrammar
    control: torch.Tensor  # [V] bool, Grammars.control_tokens


def new_matcher(grammar: Constraint) -> Any:
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammar.compiled)


def mask(logits: torch.Tensor, matchers: list[Any], control: torch.Tensor) -> list[int]:
    """Mask every constrained row's disallowed tokens to -inf (in place, [B, V]), and the
    control-character tokens ([V] bool); returns the constrained rows' batch indices."""
    idx = [b for b, m in enumerate(matchers) if m is not None]
    if not idx:
        return idx
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])  # [B, ceil(V/32)]
    for b in idx:  # the matcher walk is per row (xgrammar's own C++), the mask is batched
        matchers[b].fill_next_token_bitmask(bitmask, b)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=idx)
    at = torch.tensor(idx, device=logits.device)
    logits[at] = logits[at].masked_fill(control.to(logits.device), float("-inf"))
    return idx


def accept(matchers: list[Any], idx: list[int], tokens: list[int]) -> list[int]:
    """Advance the constrained rows' matchers; returns the rows whose token was refused."""
    return [
        b
        for b in idx
        if not matchers[b].is_terminated() and not matchers[b].accept_token(tokens[b])
    ]
