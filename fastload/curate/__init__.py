"""Retrieval-curated transfer sets (RECIPES.md section 7): the pool's nearest neighbours of a
target task's images, in a foundation model's embedding space, searched with faiss.
See ``fastload.curate.core`` and docs/guide/curation.md."""
from fastload.curate.core import SubsetSampler, TransferSet, curate, load_transfer_set, main, pool_embeddings

__all__ = ["curate", "TransferSet", "SubsetSampler", "load_transfer_set", "pool_embeddings", "main"]
