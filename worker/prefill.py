"""Prefill of the rows a step admits: prompts in, first-token logits and per-row KV out.

Rows are grouped so little is computed twice or padded:
- rows whose prompts share a prefix of at least `PrefixPolicy.min_tokens` (with at least
  `min_rows` rows, or a prefix kept from an earlier step) compute that prefix once, batch 1, and
  its KV is repeated for every row; the prefix of the latest such group is kept for later
  admissions (`PrefixStore`);
- the others are prefilled in length groups whose padding stays under `prefill_max_waste`.

Each group is one left-padded forward into a scratch cache; every row's real KV columns are then
handed to the slot cache (`worker.kv_slots`). Shapes: b = rows of a group, T = padded length,
P = shared prefix, S = longest suffix, V = vocabulary, H/D = heads/head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from worker.buckets import plan_buckets
from worker.kv_cache import layer_kv, new_cache
from worker.rows import Row

if TYPE_CHECKING:
    from worker.engine import Engine

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [H, L, D]


@dataclass(frozen=True)
class PrefixPolicy:
    """When rows admitted together compute their common prompt prefix once and reuse it.

    Measured on CPU (bench/engine.py): a clear win from a few rows and a few dozen tokens; a
    loss for one row (the extra forward call buys nothing).
    """

    min_tokens: int = 32  # shared prefix length
    min_rows: int = 2


@dataclass
class Prefilled:
    row: Row
    logits: torch.Tensor  # [V] of the last prompt token
    kv: KV  # the row's whole prompt, per layer


@dataclass
class Group:
    rows: list[Row]
    prefix: int = 0  # shared prefix length (0: a plain length group)

    def cost(self) -> int:
        """Token positions this group's forward computes."""
        longest = max(len(r.req.prompt_ids) for r in self.rows)
        return (
            longest * len(self.rows)
            if not self.prefix
            else (self.prefix + len(self.rows) * (longest - self.prefix))
        )


class PrefixStore:
    """The KV of the latest shared prefix, kept for rows admitted in later steps."""

    def __init__(self) -> None:
        self.ids: tuple[int, ...] = ()
        self.kv: KV = []

    def match(self, prompt: list[int]) -> int:
        n = len(self.ids)
        return n if n and len(prompt) > n and tuple(prompt[:n]) == self.ids else 0

    def keep(self, ids: list[int], kv: KV) -> None:
        self.ids, self.kv = tuple(ids), kv

    def clear(self) -> None:
        self.ids, self.kv = (), []


def plan_groups(engine: Engine, rows: list[Row]) -> list[Group]:
    """Shared-prefix groups first (prompts sorted, neighbours compared), then length groups."""
    policy = engine.prefix_policy
    order = sorted(rows, key=lambda r: r.req.prompt_ids)
    groups: list[Group] = []
    rest: list[Row] = []
    i = 0
    while i < len(order):
        j, common = i + 1, len(order[i].req.prompt_ids) - 1
        while j < len(order):
            c = min(
                _common(order[i].req.prompt_ids, order[j].req.prompt_ids),
                len(order[j].req.prompt_ids) - 1,
            )
            if min(common, c) < policy.min_tokens:
                break
            common, j = min(common, c), j + 1
        stored = engine.prefixes.match(order[i].req.prompt_ids)
        if j - i >= max(2, policy.min_rows) and common >= policy.min_tokens:
            groups.append(Group(order[i:j], common))
        elif stored and all(engine.prefixes.match(r.req.prompt_ids) for r in order[i:j]):
            groups.append(Group(order[i:j], stored))
        else:
            rest.extend(order[i:j])
        i = j
    return groups + _length_groups(engine, rest)


def _length_groups(engine: Engine, rows: list[Row]) -> list[Group]:
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: len(r.req.prompt_ids))
    waste = engine.prefill_max_waste if engine.kv_buffers else 1.0
    lengths = [len(r.req.prompt_ids) for r in rows]
    plan = plan_buckets(lengths, len(rows), 1 << 62, waste)
    return [Group([rows[k] for k in bucket]) for bucket in plan]


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def prefill_group(engine: Engine, group: Group) -> list[Prefilled]:
    if group.prefix:
        return _prefill_shared(engine, group.rows, group.prefix)
    return _prefill_plain(engine, group.rows)


def _prefill_plain(engine: Engine, rows: list[Row]) -> list[Prefilled]:
    """One left-padded forward over these prompts."""
    T = max(len(r.req.prompt_ids) for r in rows)
    cache = new_cache(engine.model.config, T, buffered=engine.kv_buffers)
    ids, mask = engine.left_pad([r.req.prompt_ids for r in rows], T)  # [b, T] each
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T] real tokens at 0..n-1
    logits = engine.forward(ids, mask, pos, cache)  # [b, V]
    engine.stats.prefill_tokens += len(rows) * T
    out = []
    for b, row in enumerate(rows):
        n = len(row.req.prompt_ids)
        out.append(Prefilled(row, logits[b], _row_kv(cache, b, [(T - n, T)])))
    return out


def _prefill_shared(engine: Engine, rows: list[Row], P: int) -> list[Prefilled]:
    """The P-token prefix once (batch 1, or taken from the PrefixStore), its KV repeated for
    every row, then the suffixes: columns are [prefix P | left padding | suffix]."""
    dev = engine.device
    B = len(rows)
    prefix_ids = rows[0].req.prompt_ids[:P]
    T = max(len(r.req.prompt_ids) for r in rows)  # = P + the longest suffix
    cache = new_cache(engine.model.config, T, buffered=engine.kv_buffers)
    ones = torch.ones((1, P), dtype=torch.long, device=dev)  # [1, P]
    stored = engine.prefixes.match(rows[0].req.prompt_ids) == P
    if stored:
        for i, (k, v) in enumerate(engine.prefixes.kv):
            cache.update(k[None], v[None], i)  # [1, H, P, D]
    else:
        engine.forward(
            torch.tensor([prefix_ids], device=dev), ones, torch.arange(P, device=dev)[None], cache
        )  # logits unused
        engine.stats.prefill_tokens += P
        engine.prefixes.keep(prefix_ids, _row_kv(cache, 0, [(0, P)]))
    cache.batch_repeat_interleave(B)  # [1, H, P, D] -> [B, H, P, D]
    suffixes = [r.req.prompt_ids[P:] for r in rows]  # each >= 1 token
    S = max(len(x) for x in suffixes)
    ids, smask = engine.left_pad(suffixes, S)  # [B, S] each
    mask = torch.cat([ones.expand(B, P), smask], dim=1)  # [B, P + S]
    pos = P + (smask.cumsum(-1) - 1).clamp(min=0)  # [B, S] continue after the prefix
    logits = engine.forward(ids, mask, pos, cache)  # [B, V]
    engine.stats.prefill_tokens += B * S
    engine.stats.prefix_hits += 1
    engine.stats.prefix_rows += B
    saved = (B - 1) * P + (P if stored else 0)
    engine.stats.prefix_tokens_saved += saved
    out = []
    for b, row in enumerate(rows):
        s = len(suffixes[b])
        row.cached_tokens = P if stored or b else 0
        out.append(Prefilled(row, logits[b], _row_kv(cache, b, [(0, P), (P + S - s, P + S)])))
    return out


def _row_kv(cache: DynamicCache, b: int, spans: list[tuple[int, int]]) -> KV:
    """Row b's KV over the given column spans, per layer: [H, L, D] (copied when split)."""
    out = []
    for i in range(len(cache.layers)):
        k, v = layer_kv(cache, i)  # [B, H, T, D]
        if len(spans) == 1:
            a, z = spans[0]
            out.append((k[b, :, a:z], v[b, :, a:z]))
        else:
            out.append(
                (
                    torch.cat([k[b, :, a:z] for a, z in spans], dim=1),
                    torch.cat([v[b, :, a:z] for a, z in spans], dim=1),
                )
            )
    return out


class ChunkedPrefill:
    """One prompt longer than a step's prefill budget, prefilled a chunk per step."""

    def __init__(self, engine: Engine, row: Row):
        self.engine, self.row = engine, row
        n = len(row.req.prompt_ids)
        self.cache = new_cache(engine.model.config, n, buffered=engine.kv_buffers)
        self.done = 0

    def advance(self, budget: int) -> Prefilled | None:
        """Prefill up to `budget` more tokens; the whole row once its last chunk is done."""
        eng, ids = self.engine, self.row.req.prompt_ids
        end = min(len(ids), self.done + max(1, budget))
        chunk = torch.tensor([ids[self.done : end]], device=eng.device)  # [1, c]
        mask = torch.ones((1, end), dtype=torch.long, device=eng.device)  # [1, done + c]
        pos = torch.arange(self.done, end, device=eng.device)[None]  # [1, c]
        logits = eng.forward(chunk, mask, pos, self.cache)  # [1, V]
        eng.stats.prefill_tokens += end - self.done
        self.done = end
        if end < len(ids):
            return None
        return Prefilled(self.row, logits[0], _row_kv(self.cache, 0, [(0, end)]))
