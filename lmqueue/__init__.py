"""lmqueue: asynchronous, queue-based batch inference for Hugging Face language models.

This package is the light shared core (settings, result store, queue contract, CLI). It never
imports torch, transformers or the worker package.
"""

__version__ = "0.1.0"
