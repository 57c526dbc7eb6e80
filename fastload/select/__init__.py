"""Online batch selection (ACID / ACED, JEST, RHO-LOSS): keep the most learnable rows of each
super-batch. See ``fastload.select.selector`` and docs/guide/selection.md."""
from fastload.select.rules import clip_example_losses, sigmoid_pair_losses
from fastload.select.selector import OnlineBatchSelector, SelectedBatch
from fastload.select.sidecar import load_reference, score_reference

__all__ = ["OnlineBatchSelector", "SelectedBatch", "score_reference", "load_reference",
           "sigmoid_pair_losses", "clip_example_losses"]
