"""The embeddings engine (/v1/embeddings): an encoder (`AutoModel`), mean pooling over the
attention mask, L2-normalised -- the sentence-transformers recipe of models such as MiniLM.

One job may carry many inputs; `embed()` flattens the inputs of all its jobs, sorts them by
length and runs them in padded batches within a token budget, then regroups them per job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmqueue.schemas import EMBEDDINGS, EmbeddingBody
from worker.engine import EngineStats, RequestError
from worker.gen_types import NUMERICAL_ERROR

log = logging.getLogger(__name__)


@dataclass
class EmbedRequest:
    inputs: list[list[int]]  # token ids of each input, special tokens included


@dataclass
class EmbedResult:
    embeddings: list[list[float]]  # one unit vector per input, in input order
    prompt_tokens: int


class EmbedEngine:
    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, max_context: int, name: str = ""
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_context = max_context
        self.name = name
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else 0
        self.stats = EngineStats()  # batches / rows / tokens of encoder calls; no prefix reuse

    def request(self, endpoint: str, body: dict[str, Any]) -> EmbedRequest:
        """Tokenize a /v1/embeddings body; an input longer than the context fails the request
        (as OpenAI does) instead of being truncated silently."""
        if endpoint != EMBEDDINGS:
            raise RequestError(
                "unsupported_endpoint", f"model {self.name!r} serves {EMBEDDINGS} only"
            )
        texts = EmbeddingBody.model_validate(body).inputs()
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_context:
                raise RequestError(
                    "context_length_exceeded",
                    f"input[{i}] has {len(ids)} tokens; this model's maximum context length is "
                    f"{self.max_context} tokens",
                    "input",
                )
        return EmbedRequest([list(map(int, ids)) for ids in encoded])

    def embed(
        self, requests: list[EmbedRequest], max_batch_tokens: int = 16_384, max_rows: int = 256
    ) -> list[EmbedResult | RequestError]:
        """Embed every input of every request; a request with a non-finite vector fails alone."""
        flat = [(r, i, ids) for r, req in enumerate(requests) for i, ids in enumerate(req.inputs)]
        flat.sort(key=lambda t: len(t[2]))
        vectors: dict[tuple[int, int], torch.Tensor] = {}
        start = 0
        while start < len(flat):
            end = start + 1  # rows x longest (the last, as sorted) within the token budget
            while (
                end < len(flat)
                and end - start < max_rows
                and (end - start + 1) * len(flat[end][2]) <= max_batch_tokens
            ):
                end += 1
            batch = flat[start:end]
            out = self.encode([ids for _, _, ids in batch])  # [b, D]
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.prompt_tokens += sum(len(ids) for _, _, ids in batch)
            self.stats.prefill_tokens += len(batch) * len(batch[-1][2])
            for (r, i, _), vec in zip(batch, out, strict=True):
                vectors[(r, i)] = vec
            start = end
        results: list[EmbedResult | RequestError] = []
        for r, req in enumerate(requests):
            vecs = torch.stack([vectors[(r, i)] for i in range(len(req.inputs))])
            if not bool(vecs.isfinite().all()):
                results.append(
                    RequestError(
                        NUMERICAL_ERROR, f"model {self.name!r} produced NaN/inf embeddings"
                    )
                )
                continue
            results.append(EmbedResult(vecs.tolist(), sum(len(ids) for ids in req.inputs)))
        return results

    def encode(self, batch: list[list[int]]) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings of token id lists -> [B, D] float32 on CPU."""
        T = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
        for b, row in enumerate(batch):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
        m = mask[..., None].to(torch.float32)  # [B, T, 1]
        summed = (hidden.float() * m).sum(1)  # [B, D]
        mean = summed / m.sum(1).clamp(min=1.0)  # [B, D]
        return torch.nn.functional.normalize(mean, p=2, dim=-1).cpu()
