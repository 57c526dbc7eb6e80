"""VariableBatchSampler's batch-size rounding: the default never exceeds the base batch's pixel
budget (bs0 * H0 * W0); "nearest" and "cvnets" on request; the tests' model of ml-cvnets'
grid against the upstream rule (data/sampler/utils.py, image_batch_pairs)."""
import numpy as np
import pytest

from fastload.batch.variable import VariableBatchSampler, scale_grid
from test_variable_sampler import reference_zip_grid


def random_config(rng):
    d = int(rng.choice([8, 16, 32]))
    lo = (int(rng.integers(2, 9)) * d, int(rng.integers(2, 9)) * d)
    hi = (lo[0] + int(rng.integers(0, 9)) * d, lo[1] + int(rng.integers(0, 9)) * d)
    base = (int(rng.integers(lo[0], hi[0] + 1)), int(rng.integers(lo[1], hi[1] + 1)))
    return dict(base_size=base, min_size=lo, max_size=hi, num_scales=int(rng.integers(1, 8)), divisible_by=d,
                pairing=str(rng.choice(["index", "product"])), base_batch_size=int(rng.integers(1, 301)),
                batch_reference=str(rng.choice(["base", "max"])))


def _budget(s):
    return s.base_batch_size * s.batch_reference[0] * s.batch_reference[1]


@pytest.mark.parametrize("chunk", range(6))
def test_no_step_exceeds_the_pixel_budget(chunk):
    # a property over 300 random configurations (50 per chunk), with and without aspect buckets
    rng = np.random.default_rng(1000 + chunk)
    served = 0
    for _ in range(50):
        cfg = random_config(rng)
        aspect, seed = bool(rng.integers(0, 2)), int(rng.integers(0, 4))
        served += _check_budget(cfg, aspect, seed)
    assert served >= 25  # most configurations are valid: the check ran on them


def _check_budget(cfg, aspect, seed):
    n = 257
    ratios = np.random.default_rng(seed).uniform(0.5, 2.0, n) if aspect else None
    try:
        s = VariableBatchSampler(n, **cfg, seed=seed, aspect_ratios=ratios)
    except ValueError as e:  # a grid with b < 1 is refused, never served
        assert "base_batch_size is too small" in str(e)
        return 0
    budget = _budget(s)
    grids = s.bucket_grids.values() if aspect else [s.grid]
    for g in grids:
        for h, w, b in g:
            assert 1 <= b and b * h * w <= budget < (b + 1) * h * w, (h, w, b, budget)  # largest b within
    for batch in s:
        h, w = batch[0][1], batch[0][2]
        assert len(batch) * h * w <= budget, (cfg, h, w, len(batch))
    return 1


def test_nearest_exceeds_the_budget_floor_does_not():
    # the recipe's default grid: round(327.68) = 328 samples at 160x160 is 0.1% over budget
    cfg = dict(base_size=256, base_batch_size=128, min_size=160, max_size=320, num_scales=5)
    budget = 128 * 256 * 256
    floor = VariableBatchSampler(100, **cfg).grid
    nearest = VariableBatchSampler(100, **cfg, rounding="nearest").grid
    assert max(b * h * w for h, w, b in floor) <= budget
    assert max(b * h * w for h, w, b in nearest) > budget
    assert nearest == [(160, 160, 328), (192, 192, 228), (256, 256, 128), (288, 288, 101), (320, 320, 82)]
    assert floor == [(160, 160, 327), (192, 192, 227), (256, 256, 128), (288, 288, 101), (320, 320, 81)]


def test_cvnets_rounding_differs_from_floor_and_can_exceed():
    # 29 * 256^2 / 240^2 = 32.996: cvnets' int(round(x, 2)) gives 33, over budget; floor 32
    kw = dict(base_size=256, base_batch_size=29, min_size=160, max_size=320, num_scales=5, divisible_by=16,
              pairing="product")
    cv = dict((hw[:2], hw[2]) for hw in scale_grid(**kw, rounding="cvnets"))
    fl = dict((hw[:2], hw[2]) for hw in scale_grid(**kw))
    assert cv[(240, 240)] == 33 and fl[(240, 240)] == 32
    assert all(cv[k] == int(round(29 * 256 * 256 / (k[0] * k[1]), 2)) for k in cv)
    with pytest.raises(ValueError, match="rounding"):
        VariableBatchSampler(10, rounding="round")


def test_cvnets_rounding_matches_the_cvnets_model_on_cvnets_pairs():
    # where fastload's pairs equal cvnets' (square bases), rounding="cvnets" gives its grid
    for base, bs0 in ((256, 128), (224, 64), (288, 40)):
        want = reference_zip_grid((base, base), (160, 160), (320, 320), 5, bs0=bs0)
        got = scale_grid(base, bs0, 160, 320, 5, rounding="cvnets")
        assert got == want


# Values derived by hand from image_batch_pairs / create_intervallic_integer_list /
# make_divisible of apple/ml-cvnets (each axis: sorted make_divisible of the linspace set plus
# the base; zip; int(round(bs0 * H0 * W0 / (h * w), 2))).
UPSTREAM = [
    # square base 256, bs0 128 (cvnets' defaults)
    (((256, 256), (160, 160), (320, 320), 5, 128),
     [(160, 160, 327), (192, 192, 227), (256, 256, 128), (288, 288, 101), (320, 320, 81)]),
    # base (h=200, w=224): the h axis holds its base in the linspace (5 values), the w axis does
    # not (6 values): zip pairs sorted heights with the first five sorted widths
    (((200, 224), (160, 160), (320, 320), 5, 32),
     [(160, 160, 56), (192, 192, 38), (256, 224, 25), (288, 256, 19), (320, 288, 15)]),
    # base (h=256, w=192), h in [160, 320], w in [128, 256]
    (((256, 192), (160, 128), (320, 256), 5, 96),
     [(160, 128, 230), (192, 160, 153), (256, 192, 96), (256, 224, 82), (288, 256, 64)]),
]


@pytest.mark.parametrize("args,want", UPSTREAM)
def test_cvnets_model_matches_upstream(args, want):
    base, lo, hi, n, bs0 = args
    assert reference_zip_grid(base, lo, hi, n, bs0=bs0) == want
    assert reference_zip_grid(base, lo, hi, n) == [(h, w) for h, w, _ in want]
