"""Build small random-weight Llama models with a real tokenizer, entirely offline.

Used by tests, the quickstart and benchmarks (there is no network to the Hugging Face hub).
The tokenizer is a byte-level BPE trained in seconds on CPython's own standard library
sources; the model is a `LlamaForCausalLM` with random weights from a fixed seed. Both are
written with `save_pretrained`, so they load back through plain `AutoTokenizer` /
`AutoModelForCausalLM.from_pretrained(path)` like any hub checkpoint.

    python -m worker.demo_model OUT_DIR [--size tiny|bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Size = Literal["tiny", "tiny-long", "bench"]
MARKER = "lmqueue_demo.json"
# Bump when the recipe changes, so cached demo models (e.g. the tests' cache dir) are rebuilt.
RECIPE_VERSION = 2
SEED = 1234
CORPUS_BYTES = 3_000_000  # a few MB of stdlib source: enough for an 8k vocab, trains in seconds

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Roles as in lmqueue.schemas.ChatMessage; anything else is rejected by the template itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'developer', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class _Recipe:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int


RECIPES: dict[str, _Recipe] = {
    # ~0.3M params: loads in well under a second, used by the test suite.
    "tiny": _Recipe(2000, 64, 2, 4, 2, 128, 256),
    # The same with a long context: jobs that run for seconds (cancel and deadline tests).
    "tiny-long": _Recipe(2000, 64, 2, 4, 2, 128, 8192),
    # ~42M params: big enough that batching matters, small enough for a CPU benchmark.
    "bench": _Recipe(8000, 512, 8, 8, 8, 2048, 2048),
}


def _corpus_files(limit_bytes: int = CORPUS_BYTES) -> list[Path]:
    """A deterministic subset of the stdlib's top-level .py files (sorted by name)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= limit_bytes:
            break
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise RuntimeError(f"no Python source files found under {stdlib} to train a tokenizer on")
    return files


def _corpus(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def build_tokenizer(vocab_size: int, model_max_length: int) -> Any:
    """Train a byte-level BPE and wrap it as a `PreTrainedTokenizerFast` (left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(_corpus_files()), trainer=trainer)
    # No post-processor: like many causal LM tokenizers this one does not add BOS by itself;
    # the engine adds it to completion prompts, and the chat template writes it.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _build_model(recipe: _Recipe, tokenizer: Any) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        # Larger than the usual 0.02 so the random model's next-token distribution depends
        # visibly on its context: tests of masks and positions then have teeth.
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.float32).eval()
    # Re-initialise every weight from a private generator: deterministic even when several
    # threads build at once, and the caller's global RNG state is left alone.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:  # RMSNorm scales
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=gen)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def _marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_built(path: Path, size: Size) -> bool:
    marker = _marker(path)
    return (
        marker is not None and marker.get("size") == size and marker.get("recipe") == RECIPE_VERSION
    )


def build_demo_model(out_dir: Path, size: Size = "tiny") -> Path:
    """Build (or reuse) a demo model in `out_dir` and return `out_dir`.

    Idempotent and safe under concurrency: the model is built in a temporary directory next to
    `out_dir` and renamed into place; a directory whose `lmqueue_demo.json` marker names the same
    size (and recipe version) is returned as is, an empty directory or another demo build is
    replaced, and anything else raises FileExistsError.
    """
    if size not in RECIPES:
        raise ValueError(f"unknown demo model size {size!r} (choose from {', '.join(RECIPES)})")
    out_dir = Path(out_dir).expanduser().absolute()
    if _is_built(out_dir, size):
        return out_dir
    _check_replaceable(out_dir)
    recipe = RECIPES[size]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        tokenizer = build_tokenizer(recipe.vocab_size, recipe.max_position_embeddings)
        model = _build_model(recipe, tokenizer)
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        marker = {
            "size": size,
            "recipe": RECIPE_VERSION,
            "seed": SEED,
            "vocab_size": len(tokenizer),
            "parameters": n_params,
            "python": sys.version.split()[0],
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last
        for path in tmp.iterdir():  # safetensors writes 0600; make the cache shareable
            path.chmod(0o644)
        _move_into_place(tmp, out_dir, size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built demo model %s (%s) in %.1fs", out_dir, size, time.perf_counter() - started)
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or another demo model may be replaced, never unrelated files."""
    if out_dir.is_dir() and _marker(out_dir) is None and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not an lmqueue demo model ({MARKER})")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")


def _move_into_place(tmp: Path, out_dir: Path, size: Size) -> None:
    for _ in range(5):
        try:
            os.rename(tmp, out_dir)  # atomic; also replaces an empty directory
            return
        except OSError:
            if _is_built(out_dir, size):
                return  # another process won the race with an identical build
            # Another demo build (other size or recipe) is in the way: move it aside, retry.
            try:
                _check_replaceable(out_dir)
            except FileNotFoundError:
                continue  # a concurrent build moved it aside while we looked

            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out_dir, trash)
            except FileNotFoundError:
                continue  # someone else moved it meanwhile
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not move the demo model into {out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.demo_model", description="Build an offline random-weight demo model."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(RECIPES), default="tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    path = build_demo_model(args.out_dir, args.size)
    print(f"{path} ({args.size}) ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
