"""logit_bias and the repetition penalties, applied per row inside one batched step.

Each penalised row keeps its generated-token counts and a mask of the tokens it has seen (prompt
and output) as [V] tensors; a step stacks them for the rows that need them and applies every
row's own parameters in a few tensor ops over the batch ([P, V]), then adds the tokens it chose.

Definitions (what the tests' reference implementation also computes):
- presence_penalty / frequency_penalty, OpenAI's: logit[j] -= frequency * count[j] +
  presence * (count[j] > 0), where count[j] is how often token j was *generated* so far;
- repetition_penalty, vLLM's (after CTRL/HF): for every token in the prompt or generated so far,
  a positive logit is divided by it and a negative one multiplied;
- logit_bias: added to the token's logit before any of the above.
"""

from __future__ import annotations

import torch

from worker.rows import Row


def apply_bias(logits: torch.Tensor, rows: list[Row]) -> None:
    """Add every row's logit_bias in one scatter ([B, V], in place)."""
    pairs = [(b, t, v) for b, r in enumerate(rows) for t, v in r.req.logit_bias.items()]
    if not pairs:
        return
    where = torch.tensor([(b, t) for b, t, _ in pairs], dtype=torch.long, device=logits.device)
    vals = torch.tensor([v for _, _, v in pairs], dtype=logits.dtype, device=logits.device)
    logits.index_put_((where[:, 0], where[:, 1]), vals, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Penalise the rows that ask for it (in place); returns their batch indices, for
    `record`."""
    idx = [b for b, r in enumerate(rows) if r.req.penalised()]
    if not idx:
        return idx
    dev, V = logits.device, logits.shape[-1]
    for b in idx:  # once per row: its state is created when it first decodes
        if rows[b].counts is None:
            _start(rows[b], V, dev)
    counts = torch.stack([rows[b].counts for b in idx])  # type: ignore[misc]  # [P, V]
    seen = torch.stack([rows[b].seen for b in idx])  # type: ignore[misc]  # [P, V] bool
    freq, pres, rep = (
        torch.tensor([getattr(rows[b].req, name) for b in idx], device=dev)[:, None]
        for name in ("frequency_penalty", "presence_penalty", "repetition_penalty")
    )  # each [P, 1]
    sub = logits[idx]  # [P, V]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[idx] = sub
    return idx


def record(rows: list[Row], idx: list[int], tokens: torch.Tensor) -> None:
    """Count the chosen tokens of the penalised rows (one scatter over their stacked state)."""
    if not idx:
        return
    dev = tokens.device
    counts = torch.stack([rows[b].counts for b in idx])  # type: ignore[misc]
    seen = torch.stack([rows[b].seen for b in idx])  # type: ignore[misc]
    chosen = tokens[torch.tensor(idx, device=dev)]  # [P]
    at = torch.arange(len(idx), device=dev)
    counts[at, chosen] += 1
    seen[at, chosen] = True
    for i, b in enumerate(idx):  # views into the stacked state: no copy per row
        rows[b].counts, rows[b].seen = counts[i], seen[i]


def _start(row: Row, V: int, dev: torch.device) -> None:
    row.counts = torch.zeros(V, device=dev)
    seen = torch.zeros(V, dtype=torch.bool, device=dev)
    prompt = torch.tensor(row.req.prompt_ids, dtype=torch.long, device=dev)
    seen[prompt.clamp(0, V - 1)] = True
    if row.tokens:  # resumed after a preemption: nothing generated is lost
        gen = torch.tensor(row.tokens, dtype=torch.long, device=dev)
        row.counts.index_add_(0, gen, torch.ones(len(row.tokens), device=dev))
        seen[gen] = True
    row.seen = seen
