#!/usr/bin/env bash
# The GPU check, on the GPU machine's image as it is (no network there): a venv that sees the
# image's packages, the carried wheels (.gpu-bundle/, `make gpu-bundle` here) installed offline
# into it, then every path of bench/gpu_paths.py in its own process and time budget
# (bench/gpu_check.py), and one table on stdout and in $OUT/gpu_table.md.
#
#   bash bench/gpu_check.sh                  # on the GPU machine, from the repository root
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh # the same on a CPU with a 0.3M model (rehearsal:
#                                            # scripts/gpu_rehearsal.sh sets it all up)
#
# Knobs: GPU_CHECK_PYTHON (the image's interpreter, default python3), GPU_CHECK_BUNDLE (the
# wheel folder, default .gpu-bundle), GPU_CHECK_VENV (default /tmp/lmq-gpu-venv),
# GPU_CHECK_BUDGET_S (all paths together, default 420), GPU_CHECK_PATHS (a subset, in order).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
IMAGE_PY=${GPU_CHECK_PYTHON:-python3}
BUNDLE=${GPU_CHECK_BUNDLE:-.gpu-bundle}
VENV=${GPU_CHECK_VENV:-/tmp/lmq-gpu-venv}
T0=$(date +%s)

shopt -s nullglob
wheels=("$BUNDLE"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_check: no wheels in $BUNDLE: run 'make gpu-bundle' here and carry $BUNDLE" >&2
  exit 2
fi
echo "gpu_check: image python: $("$IMAGE_PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# A venv, not the image's site-packages: the carried transformers must shadow the image's own
# without changing the image. The image's python3 is itself a venv (/opt/torch/.venv), whose
# packages `--system-site-packages` does not reach (that flag shows the *base* interpreter's),
# so a .pth file lists the image interpreter's own package folders after the venv's.
# --without-pip: no ensurepip needed; the image's pip installs into the venv with --target.
rm -rf "$VENV"
if "$IMAGE_PY" -m venv --without-pip --system-site-packages "$VENV"; then
  PY=$VENV/bin/python
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$IMAGE_PY" - "$PY" >"$SITE/_gpu_image.pth" <<'EOF'
import os, subprocess, sys
venv_paths = set(subprocess.run([sys.argv[1], "-c", "import sys; print('\\n'.join(sys.path))"],
                                capture_output=True, text=True).stdout.split("\n"))
for p in sys.path:
    if p and os.path.isdir(p) and p not in venv_paths and not p.endswith(".zip"):
        print(p)
EOF
  echo "gpu_check: venv $VENV; image package folders: $(tr '\n' ' ' <"$SITE/_gpu_image.pth")"
else
  echo "gpu_check: no venv could be made; installing into a folder on PYTHONPATH instead" >&2
  PY=$IMAGE_PY
  SITE=$VENV/site
  mkdir -p "$SITE"
  export PYTHONPATH="$SITE"
fi
# One version of each, no dependency resolution: tests/test_gpu_bundle.py checks that every
# dependency of these wheels is on the image or in the bundle.
if ! "$IMAGE_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" "${wheels[@]}"; then
  echo "gpu_check: the offline install of $BUNDLE failed" >&2
  exit 3
fi
echo "gpu_check: installed ${#wheels[@]} wheels offline in $(( $(date +%s) - T0 ))s"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
args=(--budget "${GPU_CHECK_BUDGET_S:-420}")
[ "${GPU_CHECK_TINY:-0}" = 1 ] && args+=(--tiny)
[ -n "${GPU_CHECK_PATHS:-}" ] && args+=(--paths $GPU_CHECK_PATHS)
"$PY" -m bench.gpu_check "${args[@]}"
rc=$?
echo "gpu_check: exit $rc after $(( $(date +%s) - T0 ))s in all"
exit $rc
