#!/usr/bin/env bash
# CPU rehearsal of the GPU check (issue 16): bench/gpu_check.sh end to end with GPU_CHECK_TINY=1
# against a stand-in for the GPU image, so the one GPU run does not die on an import.
#
#   bash scripts/gpu_rehearsal.sh        # or: make gpu-rehearsal
#
# The stand-in (.gpu-standin/, git-ignored) is a venv with only what the image has for this
# run: torch (CPU), transformers 5.17 (the image's), tokenizers, huggingface-hub, safetensors,
# accelerate, numpy, jinja2 -- and NOT pydantic / pydantic-settings, like the image. It runs
# on CPython 3.11, not the image's 3.12: no CPU build of torch for cp312 can be had here (the
# PyTorch CPU index is unreachable; PyPI's Linux torch is the CUDA build, ~900 MB plus ~3 GB of
# nvidia-* wheels; the local wheel cache holds torch 2.13 CPU for cp311 only). So it runs with
# a cp311 copy of the bundle (.gpu-bundle-py311/, same pins), and a second leg proves the real
# cp312 bundle installs offline into a CPython 3.12 venv and the core's pydantic modules import.
# Knobs: STANDIN_PYTHON (3.11 interpreter), TORCH_WHEEL, PY312 (3.12 interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
STANDIN_PYTHON=${STANDIN_PYTHON:-$PYENV_ROOT/versions/3.11.7/bin/python}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1)}
PY312=${PY312:-$(ls "$PYENV_ROOT"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
HOST_PY=${HOST_PY:-python3}
T0=$(date +%s)

if [ ! -x .gpu-standin/bin/python ]; then
  echo "rehearsal: building the image stand-in .gpu-standin (torch: $TORCH_WHEEL)"
  "$STANDIN_PYTHON" -m venv .gpu-standin
  .gpu-standin/bin/pip install -q "$TORCH_WHEEL" transformers==5.17.0 huggingface-hub==1.33.0 \
    tokenizers==0.23.2 safetensors==0.8.0 accelerate==1.15.0 numpy jinja2 typer regex pyyaml \
    tqdm packaging psutil
  # Something above pulls pydantic in; the image has none of these.
  .gpu-standin/bin/pip uninstall -q -y pydantic pydantic-core pydantic-settings \
    annotated-types typing-inspection || true
fi
if .gpu-standin/bin/python -c 'import pydantic' 2>/dev/null; then
  echo "rehearsal: the stand-in has pydantic; the image does not" >&2
  exit 1
fi

echo "rehearsal: the cp311 copy of the bundle (bench/gpu_bundle.txt)"
"$HOST_PY" -m bench.gpu_bundle --python 3.11 --dest .gpu-bundle-py311 2>/dev/null
T1=$(date +%s)
GPU_CHECK_TINY=1 GPU_CHECK_PYTHON=.gpu-standin/bin/python GPU_CHECK_BUNDLE=.gpu-bundle-py311 \
  GPU_CHECK_VENV=/tmp/lmq-gpu-rehearsal-venv GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-900} \
  bash bench/gpu_check.sh
rc=$?
echo "rehearsal: gpu_check.sh took $(( $(date +%s) - T1 ))s"

if [ -n "$PY312" ]; then
  echo "rehearsal: the cp312 bundle, offline, into a CPython 3.12 venv ($PY312)"
  [ -d .gpu-bundle ] || "$HOST_PY" -m bench.gpu_bundle 2>/dev/null
  rm -rf /tmp/lmq-gpu-py312
  "$PY312" -m venv --without-pip /tmp/lmq-gpu-py312
  site=$(/tmp/lmq-gpu-py312/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu-bundle/*.whl
  PYTHONPATH=$PWD /tmp/lmq-gpu-py312/bin/python -c '
import sys, pydantic, pydantic_settings
from lmqueue.registry import ModelSpec
from lmqueue.schemas import CompletionBody
spec = ModelSpec(name="m", path="/x", quantization="bnb-nf4", dtype="float16", device="cuda:0")
print("rehearsal: python", sys.version.split()[0], "pydantic", pydantic.VERSION,
      "pydantic-settings", pydantic_settings.__version__, "->", spec.quantization, "ok")'
else
  echo "rehearsal: no CPython 3.12 found: the cp312 leg did not run" >&2
fi
echo "rehearsal: exit $rc, $(( $(date +%s) - T0 ))s in all"
exit $rc
