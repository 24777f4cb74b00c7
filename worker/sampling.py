"""Choosing the next token of every row of a step, each row with its own parameters.

One step, over the batch's logits [B, V] (tensor ops over the batch; per-row Python only where
a row's own state lives: its generator's one uniform draw, its grammar matcher):
1. rows with NaN/+inf logits are marked bad (they fail alone);
2. structured-output rows get their grammar mask (worker.structured);
3. logit_bias, then presence/frequency/repetition penalties (worker.penalties);
4. logprobs, for the rows that ask, are read here: from the logits the sampler chooses from;
5. greedy rows take the argmax; sampled rows: temperature, top-k, top-p (of the top-k mass),
   min-p (relative to the most likely token), then inverse-CDF sampling from their own generator;
6. the chosen tokens advance the rows' penalty counts and grammar matchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker import penalties, structured
from worker.gen_types import TokenLogprob
from worker.rows import Row


@dataclass
class Sampled:
    tokens: torch.Tensor  # [B]
    bad: torch.Tensor  # [B] bool: NaN/+inf/no finite logit, or a token the grammar refused
    logprobs: list[TokenLogprob | None]  # per row: None unless the row asked for logprobs


def choose(logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row -> (tokens [B], bad [B])."""
    s = sample(logits, rows)
    return s.tokens, s.bad


def sample(logits: torch.Tensor, rows: list[Row]) -> Sampled:
    # -inf alone is legitimate (a masked token); NaN, +inf or an all -inf row are not.
    bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | ~logits.isfinite().any(-1)
    logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)  # [B, V], a copy
    matchers = [r.matcher for r in rows]
    constrained = []
    grammar = next((r.req.grammar for r in rows if r.matcher is not None), None)
    if grammar is not None:
        constrained = structured.mask(logits, matchers, grammar.control)
    penalties.apply_bias(logits, rows)
    penalised = penalties.apply_penalties(logits, rows)
    want = [b for b, r in enumerate(rows) if r.req.logprobs is not None]
    logp = torch.log_softmax(logits[want], dim=-1) if want else None  # [L, V]
    choice = logits.argmax(-1)  # [B] greedy for every row; sampled rows overwritten below
    sampled = [b for b, r in enumerate(rows) if r.generator is not None]
    if sampled:
        choice[torch.tensor(sampled, device=logits.device)] = _draw(logits, rows, sampled)
    penalties.record(rows, penalised, choice)
    tokens = choice.tolist()
    refused = structured.accept(matchers, constrained, tokens)
    if refused:
        bad[torch.tensor(refused, device=bad.device)] = True
    out: list[TokenLogprob | None] = [None] * len(rows)
    if logp is not None:
        _logprobs(logp, rows, want, choice, out)
    return Sampled(choice, bad, out)


def _logprobs(
    logp: torch.Tensor,
    rows: list[Row],
    want: list[int],
    choice: torch.Tensor,
    out: list[TokenLogprob | None],
) -> None:
    """Fill `out` for the rows in `want`: the chosen token's log-probability and each row's top
    alternatives (one topk over the batch at the largest k asked; [L, V] in)."""
    chosen = choice[torch.tensor(want, device=choice.device)]  # [L]
    lp = logp.gather(-1, chosen[:, None]).squeeze(-1).tolist()  # [L]
    toks = chosen.tolist()
    k = max(rows[b].req.logprobs or 0 for b in want)
    vals, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # [L, k]
    for i, (b, v, t) in enumerate(zip(want, vals.tolist(), ids.tolist(), strict=True)):
        top = rows[b].req.logprobs or 0
        out[b] = TokenLogprob(toks[i], lp[i], list(zip(t[:top], v[:top], strict=True)))


def _draw(logits: torch.Tensor, rows: list[Row], sampled: list[int]) -> torch.Tensor:
    """One token for each sampled row ([Bs])."""
    dev, V = logits.device, logits.shape[-1]
    reqs = [rows[b].req for b in sampled]
    temp = torch.tensor([r.temperature for r in reqs], device=dev)[:, None]  # [Bs, 1]
    top_p = torch.tensor([r.top_p for r in reqs], device=dev)[:, None]
    top_k = torch.tensor([r.top_k if r.top_k > 0 else V for r in reqs], device=dev)[:, None]
    min_p = torch.tensor([r.min_p for r in reqs], device=dev)[:, None]
    # One uniform draw per row from the row's own generator: a seeded request samples the
    # same tokens whatever its batch-mates (inverse-CDF sampling, vectorised below).
    u = torch.cat([torch.rand(1, generator=rows[b].generator) for b in sampled]).to(dev)
    sidx = torch.tensor(sampled, dtype=torch.long, device=dev)
    probs = torch.softmax(logits[sidx] / temp, dim=-1)  # [Bs, V]
    sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)  # [Bs, V]
    if (top_k < V).any():
        sp = sp.masked_fill(torch.arange(V, device=dev)[None, :] >= top_k, 0.0)
    cum = sp.cumsum(-1)  # [Bs, V]
    # Nucleus over what top-k kept: the smallest prefix whose mass reaches top_p (>= 1 token).
    mass = torch.where(top_k < V, cum[:, -1:], torch.ones_like(top_p))
    sp = sp.masked_fill(cum - sp >= top_p * mass, 0.0)
    if (min_p > 0).any():
        sp = sp.masked_fill(sp < min_p * sp[:, :1], 0.0)
    cum = sp.cumsum(-1)  # [Bs, V]
    target = u[:, None] * cum[:, -1:]  # [Bs, 1]
    j = torch.searchsorted(cum, target, right=True)  # [Bs, 1]
    last = (sp > 0).sum(-1, keepdim=True) - 1  # [Bs, 1] last token with mass
    j = torch.minimum(j, last.clamp(min=0))
    return si.gather(-1, j).squeeze(-1)
