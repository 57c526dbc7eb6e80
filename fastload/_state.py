"""The one state contract shared by every stateful loader and sampler.

Every stateful piece of fastload (ReinforcedLoader, DecompositionLoader, VariableBatchSampler,
BucketBatchSampler, ShardedSampler and anything added later) keeps its position in a
``Position`` and follows the same rules, so a training loop resumes the same way on all of
them, and trainers that checkpoint ``torchdata``'s ``StatefulDataLoader`` checkpoint ours
with no glue (``state_dict()`` / ``load_state_dict(state)``):

- **Position** = (epoch, step): ``step`` counts the *global* batches consumed (returned to
  the caller) in ``epoch``; it is the same number on every rank.
- **Epoch rule**: finishing a full pass moves to (epoch + 1, 0) by itself. ``set_epoch(e)``
  with the current epoch keeps the position (so ``load_state_dict(s)`` followed by the
  usual ``set_epoch(epoch)`` at the top of the epoch loop resumes mid-epoch); any other
  ``e`` moves to (e, 0).
- **One live iterator**: ``iter()`` starts a new iteration at the position; an older
  iterator of the same object is superseded, and so is one alive across
  ``load_state_dict`` or ``set_epoch`` to another epoch: its ``next()`` raises
  ``RuntimeError`` instead of silently ending or moving the position.
- **State**: a dict of plain ints, strings, lists and dicts (``torch.save`` and
  ``torch.load(weights_only=True)`` round-trip it) with the keys ``kind``, ``version``,
  ``epoch``, ``step`` and ``fingerprint`` (what the order depends on: seed, dataset size,
  global batch size, ...), plus each class's extras. Loading a state whose kind or
  fingerprint differs raises ``ValueError`` naming the field.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

STATE_VERSION = 1


class SupersededError(RuntimeError):
    """next() on an iterator that a newer iter(), load_state_dict or set_epoch replaced."""


class Position:
    """(epoch, step) of one stateful object plus the generation of its live iterator."""

    __slots__ = ("epoch", "step", "generation", "owner")

    def __init__(self, owner: str):
        self.owner = owner  # class name, used in messages and as the state's "kind"
        self.epoch = 0
        self.step = 0
        self.generation = 0

    # -- iteration -------------------------------------------------------------------------
    def begin(self) -> int:
        """Start an iteration at the current position; returns its generation token."""
        self.generation += 1
        return self.generation

    def check(self, token: int) -> None:
        """Raise if the iteration holding ``token`` was superseded."""
        if token != self.generation:
            raise SupersededError(
                f"this {self.owner} iterator was superseded by a later iter(), "
                f"load_state_dict() or set_epoch() on the same {self.owner}; iterate the "
                f"new one (zip(loader, loader) is not supported: one live iterator at a time)")

    def advance(self, token: int) -> None:
        """One batch of the iteration ``token`` was consumed."""
        self.check(token)
        self.step += 1

    def finish(self, token: int) -> None:
        """The iteration ``token`` handed out its last batch: move to the next epoch.

        Called when the last batch goes out, not at the StopIteration after it: trainers
        (Lightning) stop asking after ``len(loader)`` batches, and the next ``iter()`` must
        then start the next epoch."""
        if token == self.generation:
            self.epoch += 1
            self.step = 0
            self.generation += 1  # the finished iterator stays finished

    def is_live(self, token: int) -> bool:
        return token == self.generation

    def seek(self, epoch: int, step: int) -> None:
        """Move to (epoch, step), superseding any live iterator (a loader driving a sampler
        places it at its own position this way)."""
        self.epoch, self.step = int(epoch), int(step)
        self.generation += 1

    # -- epochs ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"{self.owner}.set_epoch: epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            self.generation += 1  # an iterator of the old epoch must not go on

    # -- state -------------------------------------------------------------------------------
    def state(self, fingerprint: Mapping[str, Any], **extra: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.owner, "version": STATE_VERSION,
                               "epoch": self.epoch, "step": self.step,
                               "fingerprint": dict(fingerprint)}
        out.update(extra)
        return out

    def load(self, state: Mapping[str, Any], fingerprint: Mapping[str, Any],
             step_aliases=("batches_done",)) -> None:
        """Validate ``state`` against this object and move to its position.

        ``step_aliases`` names older keys for ``step`` (states saved before the contract)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{self.owner}.load_state_dict expects a dict, got {type(state).__name__}")
        kind = state.get("kind", self.owner)
        if kind != self.owner:
            raise ValueError(f"{self.owner}.load_state_dict: the state was saved by a {kind}")
        version = int(state.get("version", STATE_VERSION))
        if version > STATE_VERSION:
            raise ValueError(f"{self.owner}.load_state_dict: state version {version} is newer than "
                             f"this fastload's ({STATE_VERSION}); upgrade fastload")
        check_fingerprint(self.owner, state.get("fingerprint", {}), fingerprint)
        step: Optional[Any] = state.get("step")
        for alias in step_aliases:
            if step is None:
                step = state.get(alias)
        if "epoch" not in state or step is None:
            raise ValueError(f"{self.owner}.load_state_dict: the state has no epoch/step "
                             f"(keys: {sorted(state)})")
        epoch, step = int(state["epoch"]), int(step)
        if epoch < 0 or step < 0:
            raise ValueError(f"{self.owner}.load_state_dict: negative epoch/step ({epoch}, {step})")
        self.epoch, self.step = epoch, step
        self.generation += 1  # a live iterator of the old position must not go on


def check_fingerprint(owner: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ValueError naming every field where a saved state's fingerprint differs."""
    diff = [f"{k}: saved {saved[k]!r}, now {current[k]!r}"
            for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if diff:
        raise ValueError(f"{owner}.load_state_dict: the state belongs to a different "
                         f"configuration ({'; '.join(diff)}); the order would not continue")
