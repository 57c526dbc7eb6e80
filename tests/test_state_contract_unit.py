"""Unit rules of fastload._state.Position (the loaders' parametrized resume test lives in
test_resume_contract.py)."""
import pytest

from fastload._state import Position, SupersededError


def test_epoch_rule_and_superseding():
    p = Position("X")
    t = p.begin()
    p.advance(t)
    p.advance(t)
    assert (p.epoch, p.step) == (0, 2)
    p.set_epoch(0)  # same epoch keeps the position
    assert (p.epoch, p.step) == (0, 2)
    t2 = p.begin()  # a second iteration supersedes the first
    with pytest.raises(SupersededError):
        p.advance(t)
    p.finish(t2)
    assert (p.epoch, p.step) == (1, 0)
    p.finish(t2)  # finishing twice does not advance twice
    assert (p.epoch, p.step) == (1, 0)
    t3 = p.begin()
    p.set_epoch(5)
    assert (p.epoch, p.step) == (5, 0)
    with pytest.raises(SupersededError):
        p.check(t3)
    p.finish(t3)  # a superseded iterator's end does not move the position
    assert (p.epoch, p.step) == (5, 0)


def test_state_round_trip_and_fingerprint():
    p = Position("X")
    t = p.begin()
    p.advance(t)
    s = p.state({"seed": 1, "n": 10}, skipped=0)
    assert s["kind"] == "X" and s["step"] == 1 and s["skipped"] == 0
    q = Position("X")
    q.load(s, {"seed": 1, "n": 10})
    assert (q.epoch, q.step) == (0, 1)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        q.load(s, {"seed": 2, "n": 10})
    with pytest.raises(ValueError, match="saved by a X"):
        Position("Y").load(s, {})
    old = {"epoch": 3, "batches_done": 4}  # a state saved before the contract
    q.load(old, {"seed": 1})
    assert (q.epoch, q.step) == (3, 4)
    with pytest.raises(ValueError, match="newer"):
        q.load({**s, "version": 99}, {})
    with pytest.raises(ValueError):
        Position("X").set_epoch(-1)
