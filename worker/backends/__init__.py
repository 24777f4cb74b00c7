"""Generation backends behind one seam (`base.Backend`): our slot loop (`lmqueue`), transformers'
paged continuous batching (`hf-paged`), and the batched embeddings path (`embed`)."""
