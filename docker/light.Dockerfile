# The light image: API, scheduler, Flower and the migrate step. No torch, no transformers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first (cached until pyproject.toml changes), minus the worker-only ones.
COPY pyproject.toml README.md ./
COPY scripts/requirements.py scripts/
RUN python scripts/requirements.py --light > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY . .
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 lmqueue \
    && mkdir -p /app/.lmqueue && chown lmqueue /app/.lmqueue
USER lmqueue

EXPOSE 8000 5555
CMD ["lmqueue", "api", "--host", "0.0.0.0", "--port", "8000"]
