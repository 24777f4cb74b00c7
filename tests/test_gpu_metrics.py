"""The worker's GPU metrics (no GPU here: NVML is a stand-in object)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from worker.metrics import GpuCollector, gpu_collector


class FakeNvml:
    """Answers like pynvml for two GPUs."""

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 (NVML's names)
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=50 + h)


def test_gpu_collector_exports_memory_and_utilisation() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml()))
    text = generate_latest(registry).decode()
    assert 'lmqueue_gpu_memory_used_bytes{gpu="1"} 2.147483648e+09' in text
    assert 'lmqueue_gpu_memory_total_bytes{gpu="0"} 8.589934592e+10' in text
    assert 'lmqueue_gpu_utilization_ratio{gpu="1"} 0.51' in text


def test_no_gpu_means_no_gpu_collector() -> None:
    try:
        import pynvml  # noqa: F401

        pytest.skip("pynvml is installed here")
    except ImportError:
        assert gpu_collector() is None
