"""A model's revision: a digest that changes when what answers a request changes.

The result cache keys on it, so a cached answer never outlives the weights, quantization or
chat template that produced it. Readable without torch: it hashes the registry entry and the
names, sizes and modification times of the model directory's files (weights, tokenizer and
chat template files included), or the hub cache's resolved commit for a hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lmqueue.registry import ModelSpec

_RECHECK_S = 5.0  # a file swapped under a running API is noticed within this long
_cache: dict[str, tuple[float, str]] = {}


def _files_digest(root: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file under a local model directory."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _hub_commit(hub_id: str) -> str:
    """The commit the local hub cache resolves `main` to ('' when not downloaded)."""
    home = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache/huggingface/hub")
    ref = home / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip()
    except OSError:
        return ""


def model_revision(spec: ModelSpec) -> str:
    """16 hex digits; recomputed at most every few seconds per model."""
    t = time.monotonic()
    hit = _cache.get(spec.name)
    key = spec.model_dump_json()
    if hit is not None and t - hit[0] < _RECHECK_S and hit[1].startswith(key):
        return hit[1][len(key) :]
    root = Path(spec.path)
    source: object = _files_digest(root) if root.is_dir() else _hub_commit(spec.path)
    digest = hashlib.sha256(json.dumps([key, source]).encode()).hexdigest()[:16]
    _cache[spec.name] = (t, key + digest)
    return digest
