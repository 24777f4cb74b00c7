"""Celery workers: micro-batcher and inference engine. The only package that imports torch."""
