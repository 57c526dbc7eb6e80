"""One error hierarchy: every error fastload raises on purpose is defined in fastload.errors,
derives from FastloadError and from the built-in type callers already catch, and survives a
trip through pickle (DataLoader workers send errors to the main process)."""
import ast
import inspect
import os
import pickle

import pytest

import fastload
import fastload.errors as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _public_errors():
    return [getattr(E, n) for n in E.__all__]


def test_every_public_error_is_a_fastload_error_and_a_builtin_one():
    assert set(E.__all__) == {n for n, v in vars(E).items()
                              if inspect.isclass(v) and issubclass(v, BaseException) and v.__module__ == E.__name__}
    for cls in _public_errors():
        assert issubclass(cls, E.FastloadError), cls
        if cls is not E.FastloadError:
            assert any(b.__module__ == "builtins" or b.__module__ == "_pickle"
                       for b in cls.__mro__ if b not in (cls, E.FastloadError, BaseException, Exception, object)), cls


@pytest.mark.parametrize("cls", [c for c in _public_errors()], ids=lambda c: c.__name__)
def test_errors_pickle_with_their_message(cls):
    e = cls("/data/shard-00003.arrow", "row 7: bad crc") if issubclass(cls, E.CorruptDataError) else cls("it broke")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)
    if isinstance(e, E.CorruptDataError) and not isinstance(e, E.ChecksumError):
        assert (back.path, back.detail) == ("/data/shard-00003.arrow", "row 7: bad crc")


def test_the_old_import_paths_are_the_same_classes():
    from fastload._state import SupersededError
    from fastload.format.manifest import CorruptDataError
    from fastload.importers.mldr import UnsafePickleError
    from fastload.generate import BadImageError
    from fastload.remote.client import CacheFullError, ChecksumError, RemoteError

    assert (SupersededError, CorruptDataError, UnsafePickleError, BadImageError, CacheFullError, ChecksumError,
            RemoteError) == (E.SupersededError, E.CorruptDataError, E.UnsafePickleError, E.BadImageError,
                             E.CacheFullError, E.ChecksumError, E.RemoteError)
    assert fastload.SupersededError is E.SupersededError
    assert issubclass(E.ChecksumError, E.CorruptDataError)  # a wrong digest is corrupt data


def test_no_error_class_is_defined_outside_fastload_errors():
    """A new public error must join the hierarchy: an exception class defined elsewhere in the
    package is private (leading underscore) or derives from a fastload.errors class."""
    names = set(E.__all__)
    stray = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "fastload")):
        for f in files:
            if not f.endswith(".py") or f == "errors.py" and dirpath.endswith("fastload"):
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                    continue
                bases = [ast.unparse(b) for b in node.bases]
                looks_like_error = any(b.endswith(("Error", "Exception")) for b in bases)
                if looks_like_error and not any(b.split(".")[-1] in names for b in bases):
                    stray.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}({', '.join(bases)})")
    assert not stray, "errors outside fastload.errors: " + "; ".join(stray)


def test_forged_states_raise_state_errors():
    from fastload.batch.variable import VariableBatchSampler

    s = VariableBatchSampler(40, base_size=32, base_batch_size=4, min_size=16, max_size=48, num_scales=3,
                             divisible_by=16, seed=0)
    good = s.state_dict()
    with pytest.raises(E.StateTypeError) as ei:
        s.load_state_dict([good])
    assert isinstance(ei.value, TypeError)
    with pytest.raises(E.StateError, match="past the end"):
        s.load_state_dict({**good, "step": 10 ** 9})
    with pytest.raises(E.StateTypeError):
        s.load_state_dict({**good, "step": "1"})
    with pytest.raises(E.StateError, match="different configuration"):
        s.load_state_dict({**good, "fingerprint": {}})


def test_unknowable_world_is_a_rank_mismatch(monkeypatch):
    from fastload._dist import rank_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(E.RankMismatchError, match="init_process_group"):
        rank_world(None, None, strict="VariableBatchSampler")
