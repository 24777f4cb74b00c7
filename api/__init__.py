"""The FastAPI service: validates requests, writes jobs to the store, enqueues them by name.

Never imports torch, transformers or the worker package.
"""
