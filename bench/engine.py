"""The inference engine against what users run instead, shared-prefix reuse, quantization.

    python -m bench.engine [--prompts 256] [--new-tokens 16] [--threads 1] [--parts all]

All on the bench demo model (`python -m worker.demo_model DIR --size bench`, ~42M params, built
and cached on first use), CPU, greedy decoding. Prints figures (and a Markdown table for
bench/RESULTS.md); asserts nothing about speed.

Parts (--parts, comma-separated; default all):
  continuous  256 prompts of 10-200 tokens x max_tokens 8-128: (i) the slot loop, (ii) the
          static micro-batch policy, (iii) transformers' continuous batching, (iv) the HF
          pipeline at its best N; decode-step time by live rows (bench/continuous.py);
  prefix  rows sharing a 150-token prefix with 20-token suffixes: with and without reuse, at
          several batch sizes;
  static  our decode loop with a DynamicCache vs a StaticCache (batch 64);
  quant   each quantization path vs float32: speed and greedy agreement on the same prompts.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sysconfig
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.continuous import part_continuous
from lmqueue.registry import ModelSpec
from lmqueue.settings import Settings
from worker.engine import Engine, GenRequest, GenResult, PrefixPolicy
from worker.loading import load_engine

CACHE = Path(os.environ.get("LMQUEUE_TEST_CACHE", Path.home() / ".cache" / "lmqueue-tests"))
NO_REUSE = PrefixPolicy(min_tokens=10**9)
ROWS: list[str] = []  # Markdown table rows, printed at the end


def row(*cells: object) -> None:
    line = "| " + " | ".join(str(c) for c in cells) + " |"
    ROWS.append(line)
    print(line, flush=True)


def clock(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_model() -> Path:
    from worker.demo_model import build_demo_model

    return build_demo_model(CACHE / "bench", "bench")


def mixed_prompts(tokenizer: Any, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n prompts of lo..hi tokens (BOS included), cut from CPython's argparse.py source."""
    rng = random.Random(seed)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi) - 1
        start = rng.randrange(0, len(ids) - length)
        out.append([tokenizer.bos_token_id, *ids[start : start + length]])
    return out


def greedy(prompts: list[list[int]], new: int) -> list[GenRequest]:
    return [GenRequest(p, new, temperature=0) for p in prompts]


# ---- shared prefix --------------------------------------------------------------------------


def part_prefix(engine: Engine, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    prefix = mixed_prompts(engine.tokenizer, 1, 150, 150, seed=7)[0]
    vocab = len(engine.tokenizer)
    new = args.new_tokens
    saved = engine.prefix_policy
    for batch in args.prefix_batches:
        prompts = [prefix + [rng.randrange(3, vocab) for _ in range(20)] for _ in range(batch)]
        reqs = greedy(prompts, new)
        times: dict[str, float] = {"off": float("inf"), "on": float("inf")}
        outs: dict[str, Any] = {}
        for _ in range(args.repeats):
            for mode, policy in (("off", NO_REUSE), ("on", PrefixPolicy(min_tokens=1, min_rows=1))):
                engine.prefix_policy = policy
                outs[mode], t = clock(partial(engine.generate, reqs))
                times[mode] = min(times[mode], t)
        same = all(a.token_ids == b.token_ids for a, b in zip(outs["off"], outs["on"], strict=True))
        speedup = times["off"] / times["on"]
        print(
            f"prefix 150 + suffix 20, batch {batch}: off {times['off']:.2f}s "
            f"on {times['on']:.2f}s -> {speedup:.2f}x, identical={same}"
        )
        row(
            f"shared prefix 150 + 20, batch {batch}",
            f"**{speedup:.2f}x**",
            f"{times['off']:.2f} s -> {times['on']:.2f} s, identical outputs: {same}",
        )
    engine.prefix_policy = saved


# ---- static cache ---------------------------------------------------------------------------


def part_static(engine: Engine, args: argparse.Namespace) -> None:
    """A plain decode loop (every row runs every step) with three caches: transformers'
    DynamicCache (torch.cat per step), StaticCache (preallocated, index_copy_, attends over its
    whole length every step) and ours (worker.kv_cache: preallocated, attends over the filled
    part)."""
    from transformers import DynamicCache, StaticCache

    from worker.kv_cache import new_cache

    model, B, T, N = engine.model, 64, 100, 24
    ids = torch.tensor(mixed_prompts(engine.tokenizer, B, T, T, seed=3))

    def make(kind: str) -> Any:
        if kind == "StaticCache":
            return StaticCache(config=model.config, max_cache_len=T + N)
        if kind == "DynamicCache":
            return DynamicCache(config=model.config)
        return new_cache(model.config, T + N)

    def decode(kind: str) -> tuple[float, list[list[int]]]:
        cache, static = make(kind), kind == "StaticCache"
        mask = torch.ones(B, T + N if static else T, dtype=torch.long)
        mask[:, T:] = 0
        with torch.inference_mode():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                position_ids=torch.arange(T)[None].expand(B, T),
                logits_to_keep=1,
            )
            tok = out.logits[:, -1].argmax(-1)
            toks = [tok]
            t0 = time.perf_counter()
            for step in range(N - 1):
                p = T + step
                if static:
                    mask[:, p] = 1
                else:
                    mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    past_key_values=cache,
                    position_ids=torch.full((B, 1), p),
                    logits_to_keep=1,
                )
                tok = out.logits[:, -1].argmax(-1)
                toks.append(tok)
            dt = time.perf_counter() - t0
        return B * (N - 1) / dt, torch.stack(toks, 1).tolist()

    kinds = ("DynamicCache", "StaticCache", "BufferedLayer (ours)")
    best = dict.fromkeys(kinds, 0.0)
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for kind in kinds:
            rate, outs[kind] = decode(kind)
            best[kind] = max(best[kind], rate)
    base = best["DynamicCache"]
    for kind in kinds:
        same = outs[kind] == outs["DynamicCache"]
        print(f"decode batch {B}, {T}-token prompts: {kind} {best[kind]:.0f} tok/s, same={same}")
        row(
            f"decode, batch {B}, {T}-token prompts: {kind}",
            f"{best[kind]:.0f} tok/s",
            f"{best[kind] / base:.2f}x, identical tokens: {same}",
        )


# ---- quantization ---------------------------------------------------------------------------


def next_token_agreement(engine: Engine, prompts: list[list[int]], ref: list[GenResult]) -> float:
    """Teacher-forced greedy agreement: on float32's own completions, how often the model's
    argmax is float32's next token (one divergence does not spoil the rest, unlike comparing
    free-running completions)."""
    hits = total = 0
    for prompt, r in zip(prompts, ref, strict=True):
        seq = torch.tensor([prompt + r.token_ids], device=engine.device)
        with torch.inference_mode():
            logits = engine.model(input_ids=seq).logits[0].float()  # [L, V]
        pred = logits[len(prompt) - 1 : seq.shape[1] - 1].argmax(-1).tolist()
        hits += sum(a == b for a, b in zip(pred, r.token_ids, strict=True))
        total += len(r.token_ids)
    return hits / max(1, total)


def layer_error(engine: Engine, base: Engine) -> float:
    """Relative L2 error of one quantized linear layer (layer 0's MLP up-projection) against
    float32 on random activations: the quantization itself, without the random model's
    amplification of small errors through its layers."""
    x = torch.randn(64, base.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ref_layer = base.model.model.layers[0].mlp.up_proj
    layer = engine.model.model.layers[0].mlp.up_proj
    dtype = next(iter(engine.model.parameters())).dtype
    with torch.inference_mode():
        want = ref_layer(x)
        got = layer(x.to(dtype if dtype.is_floating_point else torch.float32)).float()
    return float((got - want).norm() / want.norm())


def part_quant(base: Engine, model_dir: Path, args: argparse.Namespace) -> None:
    import importlib.util

    prompts = mixed_prompts(base.tokenizer, args.quant_prompts, 10, 200, seed=5)
    reqs = greedy(prompts, args.new_tokens)

    def timed(engine: Engine) -> tuple[list[GenResult], float]:
        engine.generate(greedy(prompts[:2], 2))  # warm-up (kernel selection, lazy init)
        best, out = float("inf"), list[Any]()
        for _ in range(args.repeats):
            out, t = clock(lambda: engine.generate(reqs))
            best = min(best, t)
        return out, best

    ref, t_ref = timed(base)
    row(f"float32 (reference), {len(prompts)} prompts", "1.00x", f"{t_ref:.2f} s")
    paths: list[tuple[str, str, Callable[[], Path]]] = [
        ("none", "float16", lambda: model_dir),
        ("none", "bfloat16", lambda: model_dir),
        ("cpu-int8", "auto", lambda: model_dir),
        ("bnb-int8", "auto", lambda: model_dir),
        ("bnb-nf4", "auto", lambda: model_dir),
        ("gptq", "auto", lambda: gptq_dir(model_dir)),
    ]
    for method, dtype, path in paths:
        label = dtype if method == "none" else method
        if method == "gptq" and not all(
            importlib.util.find_spec(m) for m in ("gptqmodel", "optimum")
        ):
            row(label, "skipped", "pip install 'lmqueue[gptq]'")
            continue
        spec = ModelSpec(name="q", path=str(path()), quantization=method, dtype=dtype)  # type: ignore[arg-type]
        engine = load_engine(spec)
        assert isinstance(engine, Engine)
        out, t = timed(engine)
        forced = next_token_agreement(engine, prompts, ref)
        err = layer_error(engine, base)
        whole = sum(x.token_ids == y.token_ids for x, y in zip(ref, out, strict=True))
        print(f"{label}: {t:.2f}s vs float32 {t_ref:.2f}s; next-token agreement {forced:.1%}")
        row(
            label,
            f"{t_ref / t:.2f}x",
            f"{t:.2f} s; greedy next-token agreement {forced:.0%}; "
            f"{whole}/{len(ref)} completions identical; one layer's error {err:.2%}",
        )
        del engine


def gptq_dir(model_dir: Path) -> Path:
    from worker.demo_model import RECIPE_VERSION
    from worker.gptq import quantize_gptq

    out = CACHE / f"{model_dir.name}-gptq4-r{RECIPE_VERSION}"
    path, t = clock(lambda: quantize_gptq(model_dir, out, bits=4, group_size=128))
    print(f"gptq checkpoint {path} ready in {t:.1f}s")
    return Path(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=Settings().max_batch_size)
    parser.add_argument("--prefill-budget", type=int, default=Settings().prefill_budget)
    parser.add_argument(
        "--admit-batch", type=int, default=Settings().admit_batch, help="0 = slots // 8"
    )
    parser.add_argument("--cb-prompts", type=int, default=64, help="requests for (iii)")
    parser.add_argument("--pipeline-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--sweep", type=int, default=32, help="requests to pick the pipeline's N")
    parser.add_argument("--prefix-batches", type=int, nargs="+", default=[1, 2, 4, 32])
    parser.add_argument("--quant-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--parts", default="continuous,prefix,static,quant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = Settings()
    model_dir = bench_model()
    engine = load_engine(ModelSpec(name="bench", path=str(model_dir)))
    assert isinstance(engine, Engine)
    engine.prefill_max_waste = settings.prefill_max_waste  # as worker.runtime does
    load = os.getloadavg()[0]
    print(f"bench model {model_dir}; torch threads {torch.get_num_threads()}; load {load:.1f}")
    parts = set(args.parts.split(","))
    sections = [
        (
            "continuous",
            lambda: part_continuous(
                engine, mixed_prompts(engine.tokenizer, args.prompts, 10, 200), args, row
            ),
        ),
        ("prefix", lambda: part_prefix(engine, args)),
        ("static", lambda: part_static(engine, args)),
        ("quant", lambda: part_quant(engine, model_dir, args)),
    ]
    for name, fn in sections:
        if name in parts:
            ROWS.append(f"| **{name}** | | |")
            _, t = clock(fn)
            print(f"-- part {name}: {t:.0f}s")
    print(
        f"\ntotal {time.perf_counter() - started:.0f}s, load average now {os.getloadavg()[0]:.1f}\n"
    )
    print("| case | figure | detail |\n| --- | --- | --- |")
    print("\n".join(ROWS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
