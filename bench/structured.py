"""Structured output against free generation: tokens/s in the same process, same batch.

    python -m bench.structured [--rows 16] [--new-tokens 64] [--size bench] [--rounds 2]

The bench demo model (random weights, float32, CPU unless CUDA is there), one engine. Each
round runs the same --rows prompts (one batch) three ways, in turn: free text, `json_object`
(any JSON object; a random model keeps writing one until max_tokens, so its batch stays full)
and a `json_schema` (bounded fields: rows finish early, so fewer share the later steps). Grammars
are compiled before the clock starts (they are cached per schema); the compile time is printed
separately. Prints figures and a Markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from bench.common import bench_model_dir
from worker.engine import Engine, GenRequest, GenResult
from worker.requests import gen_request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
FORMATS: dict[str, Any] = {
    "free": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
}


def load(size: str) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bench_model_dir(size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path).eval().to(device)
    return Engine(model, AutoTokenizer.from_pretrained(path), device, 1024, name=size)


def requests(engine: Engine, fmt: Any, rows: int, new_tokens: int) -> list[GenRequest]:
    out = []
    for i in range(rows):
        body: dict[str, Any] = {
            "model": "bench",
            "prompt": f"record {i}: ",
            "max_tokens": new_tokens,
            "temperature": 0.8,
            "seed": i,
        }
        if fmt is not None:
            body["response_format"] = fmt
        out.append(gen_request(engine, "/v1/completions", body))
    return out


def run(engine: Engine, reqs: list[GenRequest]) -> tuple[int, float]:
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results if isinstance(r, GenResult))
    return tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--size", default="bench")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    engine = load(args.size)
    t0 = time.perf_counter()
    for fmt in FORMATS.values():  # compile (and cache) every grammar before any clock starts
        requests(engine, fmt, 1, 1)
    print(f"grammar compile (tokenizer info + 2 grammars): {time.perf_counter() - t0:.2f} s")
    run(engine, requests(engine, None, 2, 4))  # warm-up
    totals: dict[str, list[float]] = {name: [0, 0.0] for name in FORMATS}
    for _ in range(args.rounds):  # interleaved, so load changes hit every way alike
        for name, fmt in FORMATS.items():
            tokens, seconds = run(engine, requests(engine, fmt, args.rows, args.new_tokens))
            totals[name][0] += tokens
            totals[name][1] += seconds
    free = totals["free"][0] / totals["free"][1]
    print(f"load average (uptime): {os.getloadavg()}, device {engine.device}")
    print("| output | tokens | seconds | tokens/s | vs free |")
    print("| --- | --- | --- | --- | --- |")
    for name, (n_tokens, secs) in totals.items():
        rate = n_tokens / secs
        print(f"| {name} | {n_tokens:.0f} | {secs:.2f} | {rate:.1f} | {rate / free:.2f} |")


if __name__ == "__main__":
    main()
