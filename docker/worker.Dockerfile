# The worker image: torch + transformers. The default torch wheel carries CUDA (the compose
# `worker` service reserves a GPU); set TORCH_INDEX_URL to a CPU-only wheel index for a much
# smaller image for the `worker-cpu` service.
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
RUN python scripts/requirements.py > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt nvidia-ml-py

COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 lmqueue \
    && mkdir -p /app/.lmqueue /home/lmqueue/.cache/huggingface \
    && chown -R lmqueue /app/.lmqueue /home/lmqueue/.cache
USER lmqueue

EXPOSE 9100
CMD ["lmqueue", "worker"]
