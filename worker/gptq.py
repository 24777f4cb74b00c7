"""Make a GPTQ checkpoint from a float one (transformers `GPTQConfig` -> optimum -> gptqmodel).

Serving a GPTQ checkpoint needs nothing from here (`quantization = "gptq"` loads it through
`from_pretrained`); this is for tests, benchmarks and the GPU check, which quantize a demo model
themselves. Needs `pip install 'lmqueue[gptq]'`.

    python -m worker.gptq SRC_DIR OUT_DIR [--bits 4] [--group-size 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

# Short code-like calibration texts: enough for the demo models (their tokenizer was trained on
# Python sources). Real models should be quantized with text like what they will serve.
CALIBRATION = [
    "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv[1:]:\n        print(arg)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n",
    "with open(path, encoding='utf-8') as f:\n    lines = [line.rstrip() for line in f]\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\nreturn value\n",
    "result = {key: len(items) for key, items in groups.items() if items}\n",
    "if __name__ == '__main__':\n    raise SystemExit(main(sys.argv))\n",
    "logging.basicConfig(level=logging.INFO, format='%(message)s')\nlog = logging.getLogger()\n",
]


def quantize_gptq(
    src: Path,
    out: Path,
    bits: int = 4,
    group_size: int = 32,
    device: str = "cpu",
    calibration: list[str] | None = None,
) -> Path:
    """Quantize `src` into `out` (written atomically: a temp dir renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    out = Path(out).absolute()
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(src)
    config = GPTQConfig(
        bits=bits,
        group_size=group_size,
        dataset=(calibration or CALIBRATION) * 2,
        tokenizer=tokenizer,
        desc_act=False,
    )
    dtype: Any = torch.float16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=config, device_map={"": device}, dtype=dtype
    )
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process's identical result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.gptq", description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = quantize_gptq(args.src, args.out, args.bits, args.group_size, args.device)
    print(f"{path} ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
