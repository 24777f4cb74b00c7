# The worker image: torch + transformers + the quantization kernels (bitsandbytes for bnb-int8 and
# bnb-nf4, gptqmodel for gptq; pyproject's `quant` and `gptq` extras), running `lmqueue pool`.
# The default torch wheel carries CUDA (the compose `pool` service reserves the GPUs); set
# TORCH_INDEX_URL to a CPU-only wheel index for a much smaller image for `pool-cpu`.
# gptqmodel is pinned (<7.7) to the releases built against TORCH_SPEC's torch: change both together.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi

COPY pyproject.toml README.md ./
COPY scripts/requirements.py scripts/
# nvidia-ml-py: GPU memory and utilisation metrics (skipped silently without a GPU).
RUN python scripts/requirements.py --extras quant,gptq > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt nvidia-ml-py "$TORCH_SPEC"

COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 lmqueue \
    && mkdir -p /app/.lmqueue /home/lmqueue/.cache/huggingface \
    && chown -R lmqueue /app/.lmqueue /home/lmqueue/.cache
USER lmqueue

EXPOSE 9100
CMD ["lmqueue", "pool"]
