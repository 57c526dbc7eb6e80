"""The one state contract shared by every stateful loader and sampler.

Every stateful piece of fastload (ReinforcedLoader, DecompositionLoader, VariableBatchSampler,
BucketBatchSampler, ShardedSampler, BlockShuffleSampler and its RankBatches, StreamMixer,
TiCSampler, and anything added later) derives from :class:`StepIterable`, which owns the
iteration, the position, the rules below, validation and legacy states; the class supplies
only its plan (steps of an epoch, the items of each step, its fingerprint). A training loop
thus resumes the same way on all of them, and trainers that checkpoint ``torchdata``'s
``StatefulDataLoader`` checkpoint ours with no glue (``state_dict()`` / ``load_state_dict``):

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
  global batch size, ...), plus each class's extras, plus the states of its children under
  their names (a loader's ``sampler`` / ``batch_sampler``).
- **Validation**: loading raises ``TypeError`` / ``ValueError`` naming the field for a state
  that is not a dict, lacks ``kind`` (unless it is a pre-contract state: no version, no
  fingerprint) or names another kind, has a fingerprint whose key set or values differ, an
  epoch outside [0, 2**62), a step that is negative, past the end of its epoch or not an int
  (``1.7`` and ``"1"`` are refused, never coerced). A failed load changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional

from fastload.errors import StateError, StateTypeError, SupersededError

STATE_VERSION = 1


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

    def load(self, state: Mapping[str, Any], fingerprint, step_aliases=("batches_done",),
             steps_in=None, legacy_fields: bool = False) -> None:
        """Validate ``state`` against this object and move to its position.

        ``step_aliases`` names older keys for ``step`` (states saved before the contract);
        ``steps_in(epoch)`` gives the steps of an epoch (a step past it is an error)."""
        epoch, step = validate(self.owner, state, fingerprint, step_aliases, steps_in, legacy_fields)
        self.epoch, self.step = epoch, step
        self.generation += 1  # a live iterator of the old position must not go on


# Epochs beyond this are forged (2**62 epochs of one batch would take longer than the
# universe has existed); keeping them small keeps every seed word inside 64 bits.
MAX_EPOCH = 2 ** 62


def _strict_int(owner: str, name: str, v: Any) -> int:
    """An integer field of a state: ints only (numpy ints too), never bool, float or str."""
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise StateTypeError(f"{owner}.load_state_dict: {name} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def is_legacy(state: Mapping[str, Any]) -> bool:
    """A state saved before the contract (no version, no fingerprint): it may lack ``kind``."""
    return "version" not in state and "fingerprint" not in state


def validate(owner: str, state: Any, fingerprint, step_aliases=("batches_done",),
             steps_in=None, legacy_fields: bool = False):
    """(epoch, step) of a state after every check of the contract; raises TypeError or
    ValueError naming what is wrong (forged states are rejected, never coerced).

    ``fingerprint``: a dict, or a function of the state's epoch giving it. ``steps_in(epoch)``:
    the steps of an epoch (None: unknown); a step past it is an error. ``legacy_fields``: the
    fingerprint was rebuilt from an old state's top-level fields, so only the fields it has
    are compared (a state without version and fingerprint is such an old state too)."""
    if not isinstance(state, Mapping):
        raise StateTypeError(f"{owner}.load_state_dict expects a dict (the output of state_dict()), "
                        f"got {type(state).__name__}")
    if "kind" in state:
        if state["kind"] != owner:
            raise StateError(f"{owner}.load_state_dict: the state was saved by a {state['kind']}, "
                             f"not a {owner}")
    elif not (is_legacy(state) or legacy_fields):
        raise StateError(f"{owner}.load_state_dict: the state has no 'kind' (keys: {sorted(state)})")
    version = _strict_int(owner, "version", state.get("version", STATE_VERSION))
    if version > STATE_VERSION:
        raise StateError(f"{owner}.load_state_dict: state version {version} is newer than "
                         f"this fastload's ({STATE_VERSION}); upgrade fastload")
    if version < 1:
        raise StateError(f"{owner}.load_state_dict: invalid state version {version}")
    step: Optional[Any] = state.get("step")
    for alias in step_aliases:
        if step is None:
            step = state.get(alias)
    if "epoch" not in state or step is None:
        raise StateError(f"{owner}.load_state_dict: the state has no epoch/step (keys: {sorted(state)})")
    epoch, step = _strict_int(owner, "epoch", state["epoch"]), _strict_int(owner, "step", step)
    if not 0 <= epoch < MAX_EPOCH:
        raise StateError(f"{owner}.load_state_dict: epoch {epoch} is outside [0, 2**62)")
    if step < 0:
        raise StateError(f"{owner}.load_state_dict: negative step {step}")
    saved_fp = state.get("fingerprint")
    if saved_fp is None and is_legacy(state):
        saved_fp, legacy_fields = {}, True
    if not isinstance(saved_fp, Mapping):
        raise StateTypeError(f"{owner}.load_state_dict: fingerprint must be a dict, got {type(saved_fp).__name__}")
    current = fingerprint(epoch) if callable(fingerprint) else fingerprint
    check_fingerprint(owner, saved_fp, current, exact_keys=not legacy_fields)
    if steps_in is not None:
        n = steps_in(epoch)
        if n is not None and step > int(n):
            raise StateError(f"{owner}.load_state_dict: step {step} is past the end of epoch "
                             f"{epoch} ({int(n)} steps)")
    return epoch, step


def check_fingerprint(owner: str, saved: Mapping[str, Any], current: Mapping[str, Any],
                      exact_keys: bool = True) -> None:
    """Raise ValueError naming every field where a saved state's fingerprint differs (and,
    with ``exact_keys``, every field it lacks or has in excess: an empty or renamed
    fingerprint is not a match)."""
    problems = []
    if exact_keys:
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        if missing:
            problems.append(f"missing {missing}")
        if extra:
            problems.append(f"unknown {extra}")
    problems += [f"{k}: saved {saved[k]!r}, now {current[k]!r}"
                 for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if problems:
        raise StateError(f"{owner}.load_state_dict: the state belongs to a different "
                         f"configuration (fingerprint {'; '.join(problems)}); the order would not continue")


_NOTHING = object()


class StepIterable:
    """The base of every stateful sampler and loader: it owns the iteration, the position,
    the epoch rule, supersession, ``state_dict`` / ``load_state_dict`` (validation, legacy
    states, nested children) and ``seek``. A subclass implements only its plan:

    - ``_num_steps(epoch)``: steps (global batches) of ``epoch``, the same on every rank;
    - ``_plan_steps(epoch, start)``: the items of steps ``start, start + 1, ...``; planning
      done before it returns runs on the thread calling ``iter()`` (agreement collectives go
      there), the returned iterator may be driven from a background thread;
    - ``_fingerprint(epoch)``: what the order depends on (compared key by key on load);

    and optionally ``_state_extra()`` / ``_load_extra(state, epoch, step)`` (more fields;
    the latter validates and returns a function applying them, or None), ``_state_children()``
    (name -> stateful child whose state nests under that key), ``_upgrade_state(state)``
    (reads a state saved by an older release), ``_epoch_end(epoch)`` (after the last step of
    a pass, on the thread driving the iteration) and ``_start_iteration()`` (ranks etc.).

    ``step`` counts global batches handed to the caller (a sampler of single indices: one
    index per rank per step).
    """

    _step_aliases = ("batches_done",)
    _legacy_fields = False  # set by _upgrade_state when it rebuilt the fingerprint

    def _init_position(self, kind: Optional[str] = None) -> None:
        self._pos = Position(kind or type(self).__name__)

    @property
    def state_kind(self) -> str:
        return self._pos.owner

    # -- to implement --------------------------------------------------------------------------
    def _num_steps(self, epoch: int) -> Optional[int]:
        raise NotImplementedError

    def _plan_steps(self, epoch: int, start: int, **kw):
        raise NotImplementedError

    def _fingerprint(self, epoch: int) -> Dict[str, Any]:
        raise NotImplementedError

    def _state_extra(self) -> Dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any], epoch: int, step: int):
        return None

    def _state_children(self) -> Dict[str, Any]:
        return {}

    def _upgrade_state(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        return state

    def _epoch_end(self, epoch: int) -> None:
        pass

    def _start_iteration(self) -> None:
        bind = getattr(self, "_bind_ranks", None)
        if bind is not None:
            bind()

    # -- position ------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._pos.epoch

    @property
    def step(self) -> int:
        """Global batches of the current epoch handed to the caller."""
        return self._pos.step

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; the current epoch keeps its position (a loaded state resumes
        mid-epoch), another one starts at its first step and supersedes a live iterator."""
        self._pos.set_epoch(epoch)

    def seek(self, epoch: int, step: int) -> None:
        """Move to (epoch, step) (a loader driving this sampler places it at its own position
        this way); supersedes a live iterator."""
        epoch, step = int(epoch), int(step)
        if epoch < 0 or step < 0:
            raise ValueError(f"{self.state_kind}.seek: epoch and step must be >= 0, got ({epoch}, {step})")
        self._pos.seek(epoch, step)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self, **kw) -> Iterator[Any]:
        self._start_iteration()
        token = self._pos.begin()  # now, not at the first next(): it supersedes the old one
        epoch = self._pos.epoch
        n = self._num_steps(epoch)
        start = self._pos.step if n is None else min(self._pos.step, n)
        return self._drive(token, epoch, start, n, self._plan_steps(epoch, start, **kw))

    def _drive(self, token: int, epoch: int, start: int, n: Optional[int], items) -> Iterator[Any]:
        pos = self._pos
        it = iter(items)
        step = start
        while n is None or step < n:
            pos.check(token)
            item = next(it, _NOTHING)
            if item is _NOTHING:
                if n is not None:
                    raise RuntimeError(f"{self.state_kind}: the plan of epoch {epoch} ended at step "
                                       f"{step} of {n}")
                break
            step += 1
            pos.step = step
            if step == n:  # the pass is complete once its last batch is out (Position.finish)
                pos.finish(token)
            yield item
        if pos.is_live(token):  # nothing more to yield (resumed at the end, or an open-ended plan)
            pos.finish(token)
        self._epoch_end(epoch)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain types (torch.save / torch.load(weights_only=True)): kind, version, epoch,
        step, fingerprint, the class's extras and its children's states under their names."""
        st = self._pos.state(self._fingerprint(self._pos.epoch), **self._state_extra())
        for name, child in self._state_children().items():
            st[name] = child.state_dict()
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at the saved position; TypeError/ValueError naming the field when the
        state is not one of this object's (forged, another configuration, past the end)."""
        kind = self._pos.owner
        if not isinstance(state, Mapping):
            raise StateTypeError(f"{kind}.load_state_dict expects a dict (the output of state_dict()), "
                            f"got {type(state).__name__}")
        self._legacy_fields = False
        state = self._upgrade_state(state)
        epoch, step = validate(kind, state, self._fingerprint, self._step_aliases, self._num_steps,
                               self._legacy_fields)
        apply = self._load_extra(state, epoch, step)
        children = [(child, state[name]) for name, child in self._state_children().items() if name in state]
        for child, sub in children:
            if not isinstance(sub, Mapping):
                raise StateTypeError(f"{kind}.load_state_dict: the nested state of its "
                                f"{type(child).__name__} must be a dict, got {type(sub).__name__}")
            child.load_state_dict(sub)
        if apply is not None:
            apply()
        self._pos.epoch, self._pos.step = epoch, step
        self._pos.generation += 1  # a live iterator of the old position must not go on
        self._after_load()

    def _after_load(self) -> None:
        pass
