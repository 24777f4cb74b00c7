"""Choosing the next token of every row of a decode step, each with its own parameters."""

from __future__ import annotations

import torch

from worker.rows import Row


def choose(logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
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
