"""The batched generation engine: a left-padded prefill, then a flat decode loop.

gpt-fast style: small and explicit, with tensor shapes in comments. It does not use
`model.generate`, so each row keeps its own sampling parameters (temperature, top-p, seed),
stop strings and token budget, and finished rows leave the running batch at once.

Three things make it cheaper than one padded `generate` call, without changing any output:
- prompts of very different lengths are prefilled in length groups (little padding computed)
  whose KV caches are merged into one decode batch;
- a prompt prefix shared by every row (a system prompt, a few-shot header) is prefilled once and
  its KV copied to every row (`PrefixPolicy`);
- the KV cache is written into preallocated buffers, not concatenated every step
  (`worker.kv_cache`).

Shapes: B = rows still running, T = padded prompt length, S = cached length (T + steps so
far), V = vocabulary size.

Usage accounting (OpenAI-like): `completion_tokens` counts every token the model generated
for the request, including an EOS token that ended it and the token that completed a stop
string. `token_ids` and `text` never contain the EOS token; `token_ids` keeps the tokens of a
stop string while `text` is cut right before it.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from lmqueue.schemas import CHAT, COMPLETIONS
from worker.buckets import plan_buckets
from worker.kv_cache import layer_kv, new_cache, supports_buffered

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


class RequestError(Exception):
    """A permanent, per-request error (400-style): it fails this request only."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def as_dict(self) -> dict[str, str | None]:
        """OpenAI-shaped error object."""
        return {
            "type": "invalid_request_error",
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r}, {self.param!r})"


@dataclass
class _Row:
    """The decode state of one request in the running batch."""

    index: int  # position in the caller's request list
    req: GenRequest
    limit: int  # max completion tokens for this row
    generator: torch.Generator | None  # None for greedy rows
    tokens: list[int] = field(default_factory=list)  # generated, EOS excluded
    completion_tokens: int = 0  # generated, EOS included
    finish_reason: str = ""
    error: RequestError | None = None
    # Incremental detokenisation, only for rows with stop strings.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_at: int = -1  # index in `text` where a stop string starts


@dataclass
class EngineStats:
    """Counters since the engine started (read by the metrics exporter; one writer thread)."""

    batches: int = 0  # generate() calls that ran at least one row
    rows: int = 0
    prompt_tokens: int = 0  # real prompt tokens of those rows
    prefill_tokens: int = 0  # token positions the prefill computed (real + padding)
    prefix_hits: int = 0  # batches that reused a shared prefix's KV
    prefix_rows: int = 0  # rows in those batches
    prefix_tokens_saved: int = 0  # prefill positions not computed thanks to the reuse
    oom_splits: int = 0  # batches split in half after running out of device memory (runner)


@dataclass(frozen=True)
class PrefixPolicy:
    """When a batch computes its rows' common prompt prefix once (batch 1) and reuses it.

    Measured on CPU (bench/engine.py): a clear win from a few rows and a few dozen tokens; a
    loss for one row (the extra forward call buys nothing).
    """

    min_tokens: int = 32  # shared prefix length
    min_rows: int = 2


class Engine:
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
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_context = max_context
        self.name = name

        self.eos_ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                self.eos_ids.add(eos)
            elif isinstance(eos, list | tuple):
                self.eos_ids.update(int(e) for e in eos)
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids, default=0)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.n_embeddings: int = model.get_input_embeddings().weight.shape[0]
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self.prefix_policy = prefix_policy or PrefixPolicy()
        # Prefill in length groups whose padding stays under this fraction (1.0 = one group).
        self.prefill_max_waste = prefill_max_waste
        # Plain full-attention cache layers: decoded with preallocated KV buffers, and prefill
        # groups can be merged. Other layer kinds (sliding window, ...) keep transformers'
        # own cache and one padded prefill per call.
        self.kv_buffers = supports_buffered(model.config)
        self.stats = EngineStats()

    # ---- prompts ------------------------------------------------------------------------

    def prompt_ids(self, endpoint: str, body: dict[str, Any]) -> list[int]:
        """/v1/completions: tokenize body['prompt'] (a str; add the BOS token if the tokenizer
        defines one and does not add it itself).
        /v1/chat/completions: tokenizer.apply_chat_template(messages, add_generation_prompt=True).
        Raises RequestError('chat_template_missing', ...) when the tokenizer has no chat template.
        """
        if endpoint == COMPLETIONS:
            return self._completion_ids(body.get("prompt"))
        if endpoint == CHAT:
            return self._chat_ids(body.get("messages"))
        raise RequestError("unsupported_endpoint", f"model {self.name!r} does not serve {endpoint}")

    def _completion_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("invalid_prompt", "prompt must be a string", "prompt")
        ids: list[int] = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _chat_ids(self, messages: Any) -> list[int]:
        from jinja2 import TemplateError
        from pydantic import ValidationError

        from lmqueue.schemas import ChatMessage

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "chat_template_missing",
                f"model {self.name!r} has no chat template; use /v1/completions instead",
                "messages",
            )
        if not isinstance(messages, list) or not messages:
            raise RequestError("invalid_messages", "messages must be a non-empty list", "messages")
        try:
            parsed = [ChatMessage.model_validate(m) for m in messages]
        except ValidationError as exc:
            raise RequestError("invalid_messages", str(exc), "messages") from exc
        dicts = [{"role": m.role, "content": str(m.content)} for m in parsed]
        try:
            out = self.tokenizer.apply_chat_template(
                dicts, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:
            raise RequestError(
                "chat_template_error", f"the chat template rejected the messages: {exc}", "messages"
            ) from exc
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding
            out = out["input_ids"]
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return [int(t) for t in out]

    # ---- generation ---------------------------------------------------------------------

    def _check(self, req: GenRequest) -> RequestError | None:
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
        return None

    def generate(self, requests: list[GenRequest]) -> list[GenResult | RequestError]:
        """ONE batched decode for all requests (the caller already grouped them).

        A request whose prompt_tokens + max_tokens > max_context gets
        RequestError('context_length_exceeded', ...) and is left out of the batch; the others
        still run. Same for an empty prompt. Device errors (e.g. CUDA OOM) propagate: they
        concern the whole batch.
        """
        errors: dict[int, RequestError] = {}
        rows: list[_Row] = []
        for i, req in enumerate(requests):
            err = self._check(req)
            if err is not None:
                errors[i] = err
                continue
            generator = None
            if req.temperature > 0:
                generator = torch.Generator(device="cpu")
                seed = req.seed if req.seed is not None else secrets.randbits(63)
                generator.manual_seed(seed)
            limit = min(req.max_tokens, self.max_context - len(req.prompt_ids))
            rows.append(_Row(index=i, req=req, limit=limit, generator=generator))
        if rows:
            self.stats.batches += 1
            self.stats.rows += len(rows)
            self.stats.prompt_tokens += sum(len(r.req.prompt_ids) for r in rows)
            with torch.inference_mode():
                self._decode(list(rows))
        results: list[GenResult | RequestError] = []
        by_index = {r.index: r for r in rows}
        for i in range(len(requests)):
            results.append(errors[i] if i in errors else self._result(by_index[i]))
        return results

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        # ids, pos: [B, q]; mask: [B, S] covering the cache and the q new tokens -> [B, V] fp32
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _decode(self, rows: list[_Row]) -> None:
        dev = self.device
        shared = self._shared_prefix_len(rows)
        if shared:
            cache, logits, mask, pos = self._prefill_shared(rows, shared)
        else:
            cache, logits, mask, pos = self._prefill(rows)
        next_pos = pos[:, -1:] + 1  # [B, 1] position of the token chosen next
        active = rows
        while True:
            tok, bad = self._choose(logits, active)  # [B], [B]
            tok_list, bad_list = tok.tolist(), bad.tolist()
            keep: list[int] = []
            for b, row in enumerate(active):
                if bad_list[b]:
                    row.error = RequestError(
                        "numerical_error",
                        f"model {self.name!r} produced NaN/inf logits for this request",
                    )
                elif not self._push(row, tok_list[b]):
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)  # [B, S + 1]
            logits = self._forward(tok[:, None], mask, next_pos, cache)  # [B, V]
            next_pos = next_pos + 1

    def _prefill(
        self, rows: list[_Row]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill every prompt -> (cache, logits [B, V], mask [B, T], pos [B, T]), left-padded
        to the longest prompt T. Prompts of very different lengths are prefilled in length
        groups (less padding computed) whose caches are then merged into one decode batch; this
        reorders `rows` in place to the merged order."""
        T = max(len(r.req.prompt_ids) for r in rows)
        capacity = T + max(r.limit for r in rows)  # KV positions this batch can reach
        groups = self._prefill_groups(rows)
        if len(groups) == 1:
            return self._prefill_group(rows, self._cache(capacity))
        rows[:] = [rows[i] for g in groups for i in g]
        parts = []
        start = 0
        for g in groups:
            group_cache = new_cache(self.model.config, buffered=False)  # merged below
            parts.append(self._prefill_group(rows[start : start + len(g)], group_cache))
            start += len(g)

        def left(x: torch.Tensor) -> torch.Tensor:  # [b, t] -> [b, T], zeros on the left
            return torch.nn.functional.pad(x, (T - x.shape[1], 0))

        cache = self._cache(capacity)
        for i in range(len(parts[0][0].layers)):
            # [b, H, t, D] per group -> [B, H, T, D]; the zero columns are masked out.
            kvs = [layer_kv(c, i) for c, *_ in parts]
            keys = torch.cat([_pad_seq(k, T) for k, _ in kvs])
            values = torch.cat([_pad_seq(v, T) for _, v in kvs])
            cache.update(keys, values, i)
        logits = torch.cat([p[1] for p in parts])  # [B, V]
        mask = torch.cat([left(p[2]) for p in parts])  # [B, T]
        pos = torch.cat([left(p[3]) for p in parts])  # [B, T]; only the last column is used
        return cache, logits, mask, pos

    def _prefill_groups(self, rows: list[_Row]) -> list[list[int]]:
        """Row indices grouped for the prefill (ascending length, padding waste bounded), or a
        single group when splitting does not pay or the cache layers cannot be merged."""
        waste = self.prefill_max_waste
        if waste >= 1 or len(rows) < 2 or not self.kv_buffers:
            return [list(range(len(rows)))]
        order = sorted(range(len(rows)), key=lambda b: len(rows[b].req.prompt_ids))
        lengths = [len(rows[b].req.prompt_ids) for b in order]
        plan = plan_buckets(lengths, len(rows), 1 << 62, waste)
        return [[order[k] for k in bucket] for bucket in plan]

    def _cache(self, capacity: int) -> DynamicCache:
        return new_cache(self.model.config, capacity, buffered=self.kv_buffers)

    def _prefill_group(
        self, rows: list[_Row], cache: DynamicCache
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One left-padded forward over these prompts -> (cache, logits [b, V], mask, pos)."""
        T = max(len(r.req.prompt_ids) for r in rows)
        ids, mask = self._left_pad([r.req.prompt_ids for r in rows], T)  # [b, T] each
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T] real tokens at 0..n-1
        logits = self._forward(ids, mask, pos, cache)  # [b, V]
        self.stats.prefill_tokens += len(rows) * T
        return cache, logits, mask, pos

    def _prefill_shared(
        self, rows: list[_Row], P: int
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill the P-token prefix all rows share once (batch 1), copy its KV to every row,
        then prefill the suffixes: columns are [prefix P | left padding | suffix], so every
        row's last prompt token sits in the last column, as in `_prefill`."""
        dev = self.device
        B = len(rows)
        prefix = torch.tensor([rows[0].req.prompt_ids[:P]], dtype=torch.long, device=dev)
        T = max(len(r.req.prompt_ids) for r in rows)  # = P + the longest suffix
        cache = self._cache(T + max(r.limit for r in rows))
        ones = torch.ones((1, P), dtype=torch.long, device=dev)  # [1, P]
        self._forward(prefix, ones, torch.arange(P, device=dev)[None], cache)  # logits unused
        cache.batch_repeat_interleave(B)  # [1, H, P, D] -> [B, H, P, D]
        suffixes = [r.req.prompt_ids[P:] for r in rows]  # each >= 1 token
        S = max(len(x) for x in suffixes)
        ids, smask = self._left_pad(suffixes, S)  # [B, S] each
        mask = torch.cat([ones.expand(B, P), smask], dim=1)  # [B, P + S]
        pos = P + (smask.cumsum(-1) - 1).clamp(min=0)  # [B, S] continue after the prefix
        logits = self._forward(ids, mask, pos, cache)  # [B, V]
        self.stats.prefill_tokens += P + B * S
        self.stats.prefix_hits += 1
        self.stats.prefix_rows += B
        self.stats.prefix_tokens_saved += (B - 1) * P
        return cache, logits, mask, pos

    def _left_pad(self, seqs: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # [B, T] 1 = real token
        for b, seq in enumerate(seqs):
            ids[b, T - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[b, T - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _shared_prefix_len(self, rows: list[_Row]) -> int:
        """Length of the prompt prefix common to all rows, if the policy says reusing it pays;
        else 0. Every row keeps at least one suffix token (its logits start the decode)."""
        policy = self.prefix_policy
        if len(rows) < max(1, policy.min_rows):
            return 0
        first = rows[0].req.prompt_ids
        n = min(len(r.req.prompt_ids) for r in rows) - 1
        for r in rows[1:]:
            other = r.req.prompt_ids
            k = 0
            while k < n and other[k] == first[k]:
                k += 1
            n = k
            if n < policy.min_tokens:
                return 0
        return n if n >= policy.min_tokens else 0

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row -> (tokens [B], bad [B]); bad = NaN/+inf/no finite logit."""
        # -inf alone is legitimate (a masked token); NaN, +inf or an all -inf row are not.
        bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | ~logits.isfinite().any(-1)
        logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)  # [B, V]
        choice = logits.argmax(-1)  # [B] greedy for every row; sampled rows overwritten below
        sampled = [b for b, r in enumerate(rows) if r.generator is not None]
        if not sampled:
            return choice, bad
        dev = logits.device
        sidx = torch.tensor(sampled, dtype=torch.long, device=dev)  # [Bs]
        temp = torch.tensor([rows[b].req.temperature for b in sampled], device=dev)[:, None]
        top_p = torch.tensor([rows[b].req.top_p for b in sampled], device=dev)[:, None]
        # One uniform draw per row from the row's own generator: a seeded request samples the
        # same tokens whatever its batch-mates (inverse-CDF sampling, vectorised below).
        u = torch.cat([torch.rand(1, generator=rows[b].generator) for b in sampled]).to(dev)
        probs = torch.softmax(logits[sidx] / temp, dim=-1)  # [Bs, V]
        sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)  # [Bs, V]
        cum = sp.cumsum(-1)  # [Bs, V]
        # Nucleus: keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        sp = sp.masked_fill(cum - sp >= top_p, 0.0)
        cum = sp.cumsum(-1)  # [Bs, V]
        target = u[:, None] * cum[:, -1:]  # [Bs, 1]
        j = torch.searchsorted(cum, target, right=True)  # [Bs, 1]
        last = (sp > 0).sum(-1, keepdim=True) - 1  # [Bs, 1] last token with mass
        j = torch.minimum(j, last.clamp(min=0))
        choice[sidx] = si.gather(-1, j).squeeze(-1)
        return choice, bad

    def _push(self, row: _Row, token: int) -> bool:
        """Append one generated token to a row; True when the row has finished."""
        row.completion_tokens += 1
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return True
        row.tokens.append(token)
        if row.req.stop and self._check_stop(row):
            row.finish_reason = "stop"
            return True
        if row.completion_tokens >= row.limit:
            row.finish_reason = "length"
            return True
        return False

    def _check_stop(self, row: _Row) -> bool:
        # Incremental detokenisation (as in TGI/vLLM): decode a short window of tokens with
        # some left context, so multi-byte characters and leading spaces come out right.
        toks = row.tokens
        prefix = self._decode_text(toks[row.prefix_offset : row.read_offset])
        full = self._decode_text(toks[row.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for the next token
        delta = full[len(prefix) :]
        row.prefix_offset, row.read_offset = row.read_offset, len(toks)
        row.text += delta
        longest = max(len(s) for s in row.req.stop)
        start = max(0, len(row.text) - len(delta) - longest + 1)
        found = _find_stop(row.text, row.req.stop, start)
        if found < 0:
            return False
        row.stop_at = found
        return True

    def _decode_text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _result(self, row: _Row) -> GenResult | RequestError:
        if row.error is not None:
            return row.error
        text = self._decode_text(row.tokens)
        finish = row.finish_reason
        if row.req.stop:
            # Cut at the earliest stop string in the full decode (the incremental text may differ
            # in rare detokenisation corner cases; fall back to it then).
            cut = _find_stop(text, row.req.stop, 0)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif row.stop_at >= 0:
                text = row.text[: row.stop_at]
        return GenResult(
            text=text,
            token_ids=list(row.tokens),
            finish_reason=finish,
            prompt_tokens=len(row.req.prompt_ids),
            completion_tokens=row.completion_tokens,
        )


def _pad_seq(kv: torch.Tensor, T: int) -> torch.Tensor:
    """[b, H, t, D] -> [b, H, T, D], zeros on the left of the sequence axis."""
    return torch.nn.functional.pad(kv, (0, 0, T - kv.shape[2], 0))


def _find_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the earliest occurrence of any stop string at or after `start`, or -1."""
    hits = [k for k in (text.find(s, start) for s in stops) if k >= 0]
    return min(hits, default=-1)
