"""fastload: fast data loading and sampling for PyTorch.

The public API is the handful of names below; each is imported on first use, so
``import fastload`` stays cheap and a missing optional dependency only affects the feature
that needs it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> "module:attribute". The data flow reads from the folders:
# format (on-disk) -> sample (augmentation params) -> replay (kernels) -> batch (samplers)
# -> loader; ffn holds the sparse ReLU FFN.
_EXPORTS = {
    # 1. Reinforced datasets and their replay
    "AugmentPolicy": "fastload.sample.policy:AugmentPolicy",
    "reinforce": "fastload.generate:reinforce",
    "export_teacher": "fastload.generate:export_teacher",
    "ReinforcedDataset": "fastload.format.reader:ReinforcedDataset",
    "ReinforcedLoader": "fastload.loader.reinforced:ReinforcedLoader",
    "densify": "fastload.losses:densify",
    "kd_loss": "fastload.losses:kd_loss",
    "clip_distill_loss": "fastload.losses:clip_distill_loss",
    # 2. Variable-resolution batching
    "VariableBatchSampler": "fastload.batch.variable:VariableBatchSampler",
    "ResolutionCurriculum": "fastload.batch.variable:ResolutionCurriculum",
    # Samplers over shards and streams (remote data, mixing, time-continual replay)
    "BlockShuffleSampler": "fastload.batch.shuffle:BlockShuffleSampler",
    "StreamMixer": "fastload.batch.mixing:StreamMixer",
    "TiCSampler": "fastload.batch.tic:TiCSampler",
    # 3. Sequence-length buckets (Dataset Decomposition)
    "decompose": "fastload.tokens.decompose:decompose",
    "DecompositionLoader": "fastload.loader.decomposition:DecompositionLoader",
    # 4. Sparse ReLU FFN
    "SparseReLUFFN": "fastload.ffn.sparse:SparseReLUFFN",
    "relufy": "fastload.ffn.relufy:relufy",
    "sparsify_ffn": "fastload.ffn.relufy:sparsify_ffn",
    "activation_sparsity": "fastload.ffn.relufy:activation_sparsity",
    # 5. Recipes: online batch selection, retrieval-curated transfer sets, file-bytes input
    "OnlineBatchSelector": "fastload.select.selector:OnlineBatchSelector",
    "curate": "fastload.curate.core:curate",
    "BytesBatches": "fastload.bytes:BytesBatches",
    # The state contract's error: next() on an iterator a newer one replaced (every error
    # fastload raises on purpose is in fastload.errors, under FastloadError)
    "SupersededError": "fastload.errors:SupersededError",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'fastload' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
