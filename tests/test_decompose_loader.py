"""DecompositionLoader: batches equal the bucket rows the sampler picks; resume; zero copy."""
import numpy as np
import pytest
import torch

from fastload import DecompositionLoader, decompose
from fastload.batch.buckets import BucketBatchSampler


@pytest.fixture(scope="module")
def dd(tmp_path_factory):
    rng = np.random.default_rng(0)
    lens = np.minimum(rng.pareto(1.0, 400) * 60, 3000).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, 256, offsets[-1]).astype(np.int32)
    out = str(tmp_path_factory.mktemp("dd") / "dd")
    decompose((tokens, offsets), out, 4, 7, seed=0, vocab_size=257, eot_id=256, progress=False)
    return out


def test_batches_are_sampler_rows(dd):
    loader = DecompositionLoader(dd, tokens_per_step=512, seed=1, cycles=2)
    sampler = BucketBatchSampler({k: int(loader.manifest["buckets"][str(k)]["rows"]) for k in range(4, 8)},
                                 512, "pow2", 2, seed=1)
    arrays = {k: np.load(f"{dd}/bucket_{k:02d}.npy") for k in range(4, 8)}
    n = 0
    for (x, y), (k, rows) in zip(loader, sampler):
        assert x.dtype == torch.int64 and x.shape == (512 >> k, 1 << k) == y.shape
        assert x.is_contiguous() and y.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), arrays[k][rows, :-1])
        np.testing.assert_array_equal(y.numpy(), arrays[k][rows, 1:])
        n += 1
    assert n == len(loader) == len(sampler) > 10


def test_int32_zero_copy_without_shuffle(dd):
    loader = DecompositionLoader(dd, 512, dtype=torch.int32, shuffle=False)
    arrays = {k: np.load(f"{dd}/bucket_{k:02d}.npy", mmap_mode="r") for k in range(4, 8)}
    for (x, y), k in zip(loader, loader.schedule()):
        assert x.dtype == torch.int32
        assert torch.equal(x[:, 1:], y[:, :-1])
        base = arrays[k].__array_interface__["data"][0]
        # a view into the mapped file, not a copy
        assert not x.is_contiguous() and y.data_ptr() - x.data_ptr() == 4
        assert (x.data_ptr() - loader._bases[k][0]) % (((1 << k) + 1) * 4) == 0
        del base


def test_loader_resume_exact(dd):
    a = DecompositionLoader(dd, 512, seed=5)
    ref = [(x.clone(), y.clone()) for x, y in a]
    b = DecompositionLoader(dd, 512, seed=5)
    it = iter(b)
    for _ in range(7):
        next(it)
    state = b.state_dict()
    c = DecompositionLoader(dd, 512, seed=5)
    c.load_state_dict(state)
    rest = list(c)
    assert len(rest) == len(ref) - 7
    for (x, y), (rx, ry) in zip(rest, ref[7:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_bucket_subset_and_bad_arguments(dd, tmp_path):
    loader = DecompositionLoader(dd, 256, buckets=[4, 5])
    assert {x.shape[1] for x, _ in loader} == {16, 32}
    with pytest.raises(ValueError, match="not a decomposed dataset"):
        DecompositionLoader(str(tmp_path), 512)
    with pytest.raises(ValueError, match="divisible"):
        DecompositionLoader(dd, 500)
    with pytest.raises(ValueError, match="not in the dataset"):
        DecompositionLoader(dd, 512, buckets=[3])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            DecompositionLoader(dd, 512, pin_memory=True)


def test_reuse_buffers_same_values(dd):
    fresh = [(x.clone(), y.clone()) for x, y in DecompositionLoader(dd, 512, seed=2)]
    loader = DecompositionLoader(dd, 512, seed=2, reuse_buffers=2)
    ptrs = set()
    for (x, y), (rx, ry) in zip(loader, fresh):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        ptrs.add(x.data_ptr())
    assert len(ptrs) <= 2 * 4  # at most a ring of 2 per bucket
