"""fastload's errors: one hierarchy, every public error importable from here.

Every error fastload raises on purpose derives from :class:`FastloadError` *and* from the
built-in type callers already catch (``ValueError`` for bad data or state, ``OSError`` for
remote and disk trouble, ``RuntimeError`` for misuse across ranks or iterators), so
``except fastload.errors.FastloadError`` catches all of them and existing ``except
ValueError`` code keeps working. Argument errors stay plain ``ValueError``/``TypeError``.

This module imports nothing from fastload (every layer may raise these).
"""
from __future__ import annotations

import os
import pickle


class FastloadError(Exception):
    """Base of every error fastload raises on purpose."""


class CorruptDataError(FastloadError, ValueError):
    """A manifest, shard or stored blob that cannot be what fastload wrote: a flipped bit, a
    truncated or forged file, a field of the wrong type or out of range.

    ``CorruptDataError(path, detail)``: ``path`` is the file (``None`` for a blob decoded
    outside any file), ``detail`` what is wrong with it; ``str(e)`` names both.
    ``CorruptDataError(message)`` is a message that already names its file or URL.
    """

    def __init__(self, path, detail=None):
        if detail is None:
            path, detail = None, path
        self.path = None if path is None else os.fspath(path)
        self.detail = str(detail)
        super().__init__(f"{self.path}: {self.detail}" if self.path is not None else self.detail)

    def __reduce__(self):  # picklable across processes (DataLoader workers) with both fields
        return (type(self), (self.path, self.detail))


class ChecksumError(CorruptDataError):
    """Downloaded or read bytes differ from the manifest's sha256 or size (names the URL)."""


class BadImageError(FastloadError, ValueError):
    """A source image that cannot be decoded (corrupt or truncated), while reinforcing."""


class UnsafePickleError(FastloadError, pickle.UnpicklingError):
    """A foreign pickle (an ml-dr reinforcement file) asked for a global outside the
    allow-list, or for an allocation larger than its own bytes justify."""


class RemoteError(FastloadError, OSError):
    """A remote object could not be read; the message names its URL (errno says why:
    ENOENT, EACCES, EIO after retries)."""


class CacheFullError(FastloadError, OSError):
    """The cache folder cannot hold what the loader needs now (names the folder and sizes)."""


class StateError(FastloadError, ValueError):
    """A ``load_state_dict`` state that is forged, of another object or another dataset, or
    inconsistent (a step past the end, an epoch out of range)."""


class StateTypeError(StateError, TypeError):
    """A state (or one of its fields) of the wrong type; also a ``TypeError``."""


class SupersededError(FastloadError, RuntimeError):
    """next() on an iterator that a newer iter(), load_state_dict or set_epoch replaced."""


class RankMismatchError(FastloadError, RuntimeError):
    """Ranks disagree on steps, shapes or epoch, or the world cannot be known (WORLD_SIZE > 1
    without a process group); raised on every rank within seconds instead of a hang."""


__all__ = ["FastloadError", "CorruptDataError", "ChecksumError", "BadImageError", "UnsafePickleError",
           "RemoteError", "CacheFullError", "StateError", "StateTypeError", "SupersededError",
           "RankMismatchError"]
