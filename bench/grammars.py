"""Constrained-decoding libraries side by side on this CPU: xgrammar, llguidance, outlines-core.

    python -m bench.grammars [--size bench] [--reps 20] [--threads 1]

The two libraries lmqueue does not depend on come with the `grammar-bench` extra, or live
outside the venv:

    .venv/bin/pip install --target .grammar-libs llguidance==1.9.1 outlines-core==0.2.14
    PYTHONPATH=.:.grammar-libs .venv/bin/python -m bench.grammars

Each library is imported lazily; a missing one is reported as "not installed". The bench
model's tokenizer (bench.common.bench_model_dir) is wrapped once per library (reported apart:
"tokenizer info"), then two grammars are compiled for it: `json_object` (any JSON object, the
schema {"type": "object"}) and bench.structured.SCHEMA. For each:

- compile ms: the first compile. xgrammar: GrammarCompiler.compile_json_schema (precomputes its
  token mask cache). llguidance: LLMatcher.grammar_from_json_schema + the first LLMatcher (builds
  lexer and parser; token masks are computed lazily, so its first walk is slower, printed apart).
  outlines-core: json_schema.build_regex_from_schema + Index (the whole regex-DFA x vocabulary
  index, up front).
- mask µs/step: a fixed valid document, tokenized, is walked token by token: at each step the
  full vocabulary bitmask is computed (timed alone), the token is checked against it and fed to
  the matcher; a last step after the document checks that EOS is allowed. Mean and p99 over
  --reps walks after one untimed warm-up walk. "all tokens allowed" is that sanity check.
- batch-16 ms/step: 16 matchers, staggered along the same document (each restarts after EOS),
  filling one 16-row bitmask per step: xgrammar BatchGrammarMatcher.batch_fill_next_token_bitmask,
  llguidance llguidance.torch.fill_next_token_bitmask_par (an LLExecutor), outlines-core has no
  batch API (a loop of Guide.write_mask_into over the rows).

Grammars are set up as the worker does (worker/structured.py: xgrammar any_whitespace=False, so
separators are exactly ", " and ": "); llguidance gets the same (whitespace_flexible False and
those separators); outlines-core's regex has its default whitespace `[ ]?` around every separator
and treats an integer's minimum/maximum as any integer. --threads (default 1, as the worker's
compiler) bounds xgrammar's compiler and batch matcher and llguidance's executor; outlines-core
is single-threaded. Prints figures and a Markdown table; asserts nothing about speed.

On CUDA (from the installed packages: xgrammar 0.2.9, llguidance 1.9.1, outlines-core 0.2.14):
all three compute masks on the CPU only, into an int32 bitmask [B, ceil(V/32)] in CPU memory
(their fill functions refuse or assume a CPU tensor); the caller copies it to the GPU and
applies it to the logits.
- xgrammar: `xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=, indices=,
  backend="auto")`, logits and bitmask on the same device; "auto" picks a C++ CPU kernel for CPU
  logits and a Triton kernel for CUDA logits ("torch_native" on NPU, "torch_compile" elsewhere);
  backend="cuda" JIT-builds a shipped .cu kernel (torch.utils.cpp_extension, needs nvcc).
  `indices` masks only some rows of a mixed batch. allocate_token_bitmask returns an unpinned
  CPU tensor.
- llguidance: `llguidance.torch` has allocate_token_bitmask (pinned when CUDA is available),
  fill_next_token_bitmask / fill_next_token_bitmask_par (CPU bitmask only) and
  apply_token_bitmask_inplace(logits, mask): plain torch ops under torch.compile(dynamic=True),
  so on CUDA it runs what Inductor generates; no hand-written kernel, no row indices.
  llguidance.numpy and llguidance.mlx (a Metal kernel) are the other back ends.
- outlines-core: `outlines_core.kernels.torch` has allocate_token_bitmask (one row, pinned when
  CUDA is available), fill_next_token_bitmask (one-row CPU mask only) and
  apply_token_bitmask_inplace: also plain torch ops under torch.compile(dynamic=True), modelled
  on llguidance's. kernels.numpy (numba, CPU) and kernels.mlx (Metal) are the others. The core
  is Guide.write_mask_into(data_ptr, numel, element_size=4) into any contiguous CPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from bench.common import bench_model_dir
from bench.structured import SCHEMA

DOCUMENT = '{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true}'
GRAMMARS = {"json_object": {"type": "object"}, "json_schema": SCHEMA}
BATCH = 16


class Library:
    """One constrained-decoding library behind the handful of calls the bench makes."""

    name = ""
    package = ""

    def setup(self, tokenizer: Any, vocab_size: int, eos: int, threads: int) -> None:
        """Import the library and wrap the tokenizer (ImportError when it is missing)."""
        raise NotImplementedError

    def compile(self, schema: str) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        raise NotImplementedError

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for row, m in enumerate(matchers):
            self.fill(m, bitmask, row)

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def reset(self, matcher: Any) -> None:
        matcher.reset()


class XGrammar(Library):
    name, package = "xgrammar", "xgrammar"

    def setup(self, tokenizer: Any, vocab_size: int, eos: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[eos]
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self.batcher = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class LLGuidance(Library):
    name, package = "llguidance", "llguidance"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def setup(self, tokenizer: Any, vocab_size: int, eos: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.llg_torch = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.OPTIONS)
        first = self.matcher(grammar)  # grammar -> lexer + parser happen here
        if first.is_error():
            raise RuntimeError(first.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        pairs = [(m, row) for row, m in enumerate(matchers)]
        self.llg_torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class OutlinesCore(Library):
    name, package = "outlines-core", "outlines-core"

    def setup(self, tokenizer: Any, vocab_size: int, eos: int, threads: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(eos, token_bytes(tokenizer))

    def compile(self, schema: str) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(schema)
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask.shape[1]
        matcher.write_mask_into(bitmask.data_ptr() + row * words * 4, words, 4)

    def advance(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:  # "No next state found ..."
            return False
        return True


LIBRARIES: list[type[Library]] = [XGrammar, LLGuidance, OutlinesCore]


def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """outlines-core's Vocabulary map (token bytes -> ids) of a byte-level BPE tokenizer, the
    special tokens left out (EOS is given to Vocabulary apart)."""
    decode, special = byte_decoder(), set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i not in special:
            out.setdefault(bytes(decode[c] for c in text), []).append(i)
    return out


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def walk(
    lib: Library, matcher: Any, tokens: list[int], eos: int, bitmask: torch.Tensor
) -> tuple[list[float], bool]:
    """One walk of the document (then EOS): µs per mask fill, and whether every token (and EOS
    at the end) was allowed by the mask and accepted by the matcher."""
    times, ok = [], True
    for token in [*tokens, eos]:
        bitmask.zero_()  # a fill must set the allowed bits itself
        t0 = time.perf_counter_ns()
        lib.fill(matcher, bitmask, 0)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        ok = ok and allowed(bitmask, 0, token)
        if token != eos:
            ok = lib.advance(matcher, token) and ok
    return times, ok


def batch_steps(
    lib: Library, compiled: Any, tokens: list[int], bitmask: torch.Tensor, steps: int
) -> float:
    """Mean ms to fill the BATCH-row bitmask per step (the first cycle untimed)."""
    rows = bitmask.shape[0]
    matchers = [lib.matcher(compiled) for _ in range(rows)]
    pos = [row * (len(tokens) + 1) // rows for row in range(rows)]
    for m, p in zip(matchers, pos, strict=True):
        for token in tokens[:p]:
            lib.advance(m, token)
    total = 0.0
    warmup = len(tokens) + 1
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        lib.fill_batch(matchers, bitmask)
        if step >= warmup:
            total += time.perf_counter() - t0
        for row, m in enumerate(matchers):
            if pos[row] == len(tokens):
                lib.reset(m)
                pos[row] = 0
            else:
                lib.advance(m, tokens[pos[row]])
                pos[row] += 1
    return total / steps * 1e3


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def measure(
    lib: Library, schema: str, tokens: list[int], eos: int, vocab_size: int, reps: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    compiled = lib.compile(schema)
    compile_ms = (time.perf_counter() - t0) * 1e3
    bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    matcher = lib.matcher(compiled)
    cold, ok = walk(lib, matcher, tokens, eos, bitmask)
    times: list[float] = []
    for _ in range(reps):
        lib.reset(matcher)
        rep, rep_ok = walk(lib, matcher, tokens, eos, bitmask)
        times += rep
        ok = ok and rep_ok
    batch = torch.zeros((BATCH, bitmask.shape[1]), dtype=torch.int32)
    return {
        "compile": compile_ms,
        "cold": sum(cold) / len(cold),
        "mean": sum(times) / len(times),
        "p99": p99(times),
        "batch": batch_steps(lib, compiled, tokens, batch, reps * (len(tokens) + 1)),
        "ok": ok,
    }


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="bench")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    path = bench_model_dir(args.size)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab_size = max(AutoConfig.from_pretrained(path).vocab_size, len(tokenizer))
    eos = tokenizer.eos_token_id
    tokens = tokenizer(DOCUMENT, add_special_tokens=False).input_ids
    print(f"tokenizer {args.size}: vocabulary {vocab_size}, document {len(tokens)} tokens")
    lines = [
        row(
            "library",
            "grammar",
            "compile ms",
            "mask µs/step mean",
            "p99",
            f"batch-{BATCH} ms/step",
            "all tokens allowed",
        )
    ]
    lines.append(row(*["---"] * 7))
    for cls in LIBRARIES:
        lib = cls()
        t0 = time.perf_counter()
        try:
            lib.setup(tokenizer, vocab_size, eos, args.threads)
        except ImportError as exc:
            print(f"{lib.name}: not installed ({exc})")
            lines.append(row(lib.name, "not installed", "-", "-", "-", "-", "-"))
            continue
        setup_ms = (time.perf_counter() - t0) * 1e3
        print(f"{lib.name} {package_version(lib.package)}: tokenizer info {setup_ms:.1f} ms")
        for name, schema in GRAMMARS.items():
            try:
                r = measure(lib, json.dumps(schema), tokens, eos, vocab_size, args.reps)
            except Exception as exc:  # a library that cannot take the grammar: say so, go on
                print(f"  {name}: failed: {type(exc).__name__}: {exc}")
                lines.append(row(lib.name, name, "failed", "-", "-", "-", "-"))
                continue
            print(f"  {name}: first walk {r['cold']:.1f} µs/step (untimed warm-up)")
            lines.append(
                row(
                    lib.name,
                    name,
                    f"{r['compile']:.1f}",
                    f"{r['mean']:.1f}",
                    f"{r['p99']:.1f}",
                    f"{r['batch']:.3f}",
                    "yes" if r["ok"] else "no",
                )
            )
    print(f"load average: {os.getloadavg()}, {os.cpu_count()} CPUs, --threads {args.threads}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
