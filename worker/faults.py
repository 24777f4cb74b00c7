"""Device faults the runner handles: running out of accelerator memory."""

from __future__ import annotations

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator out-of-memory error (CUDA, and the same message on other
    accelerators); False for anything else, including a CPU MemoryError (the process is in
    trouble then, and splitting the batch would not help it)."""
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_cached_memory() -> None:
    """Return the CUDA caching allocator's free blocks, so a retry on fewer rows can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
