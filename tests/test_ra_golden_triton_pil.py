"""The Triton replay's pil RandAugment semantics (kernels/ra_pil.py: torchvision's RandAugment
on PIL images, Pillow's arithmetic), in the Triton interpreter, against the goldens of real
torchvision + Pillow in tests/golden/ra_sweep.npz (``pil_out0``: every case at 13x17;
``pil_sample1``: every 23rd at 37x64; ``pil_digest*``: every case at every size). The
records, the rendering (whole-image crop at the image's own size, mean 0 / std 1) and the
comparison are tests/test_ra_golden_triton.py's.

Tolerance: none (every stored array and the digests checked below are equal byte for byte).

Default run (~20 s on 2 busy cores): tests/test_ra_golden_triton.py's spread of bins of every
op and some chains, plus every fifth case where Pillow's output differs from torchvision's
tensor v1 (Color, Contrast, Sharpness, Rotate, ShearX/Y: the fixed-point geometry and the
float32 blends), at 13x17; at 37x64 AutoContrast, Equalize (whose 13x17 outputs are trivial)
and the ends of Rotate and the shears against the stored digests. ``slow``: every case at 13x17
and the sampled cases at 37x64. Checked to fail with the kernel broken on purpose: the
fixed-point shift rounding to nearest instead of flooring (Rotate, ShearX/Y), Image.blend with
the torchvision order ``alpha * x + (1 - alpha) * d`` (Color, Sharpness), AutoContrast's table
rounded instead of truncated.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from fastload.kernels import ra_pil  # noqa: E402
from fastload.kernels.replay import pack_ra  # noqa: E402
from fastload.sample import params as P  # noqa: E402

from test_ra_golden import RA_OPS, _digest, _sweep_label, sweep_image  # noqa: E402
from test_ra_golden_triton import (NONE, check, default_case, golden_arrays, identity_resize,  # noqa: E402,F401
                                   records, sweep, triton_levels)

SEM = "pil"


def _differs_from_v1(z, i):
    return bool((z["pil_out0"][i] != z["v1_out0"][i]).any())


def test_pil_matches_the_sweep_small(sweep):
    z = sweep
    identity_resize(z, 0)
    idx = check(z, 0, lambda i: default_case(z, i) or (_differs_from_v1(z, i) and i % 5 == 0), SEM)
    singles = {RA_OPS[z["ops"][i, 0]] for i in idx if z["ops"][i, 1] == NONE}
    pil_only = {RA_OPS[z["ops"][i, 0]] for i in idx if z["ops"][i, 1] == NONE and _differs_from_v1(z, i)}
    # every op, chains, and Pillow's own arithmetic where it departs from torchvision's tensors
    assert singles == set(RA_OPS) and sum(z["ops"][i, 1] != NONE for i in idx) >= 4
    assert {"Color", "Contrast", "Sharpness", "Rotate", "ShearX", "ShearY"} <= pil_only, pil_only


def test_pil_matches_the_digests_at_37x64(sweep):
    # the statistics ops (at 13x17 Equalize is the identity: < 256 pixels) and the
    # geometric ops' extreme bins (the fixed-point sums over a wider image)
    z = sweep
    n = 1
    h, w = (int(v) for v in z["sizes"][n])
    img = sweep_image(h, w, n)
    ends = {"Rotate", "ShearX", "ShearY"}
    idx = [i for i in range(len(z["ops"])) if z["ops"][i, 1] == NONE and (
        RA_OPS[z["ops"][i, 0]] in ("AutoContrast", "Equalize") or
        (RA_OPS[z["ops"][i, 0]] in ends and int(z["mags"][i, 0]) in (-30, 30)))]
    assert len(idx) == 2 + 2 * len(ends)
    got = triton_levels(img, records(z, idx), int(z["num_bins"]), SEM)
    bad = [_sweep_label(z, i) for k, i in enumerate(idx) if _digest(got[k]) != z[f"pil_digest{n}"][i].tobytes()]
    assert not bad, f"size {(h, w)}: Triton replay differs from torchvision pil (digest): {bad}"
    assert sum(not np.array_equal(g, img) for g in got) == len(idx)  # each op changed the image


@pytest.mark.slow
def test_pil_matches_the_sweep_every_case(sweep):
    assert len(check(sweep, 0, sem=SEM)) == len(sweep["ops"])


@pytest.mark.slow
def test_pil_matches_the_sweep_sampled_size(sweep):
    identity_resize(sweep, 1)
    assert len(check(sweep, 1, sem=SEM)) == len(sweep["pil_sample1"])


def test_pil_geometry_parameters():
    # translations take Pillow's scale path (whole-pixel shifts, exact in the kernel's
    # closed form); shears and rotations its 16.16 fixed point
    ip, f = ra_pil.op_params("TranslateX", -7.9, 20, 30)
    assert ip == ra_pil.SCALE_PATH and f[:4].tolist() == [1.0, 7.0, 1.0, 0.0]
    ip, f = ra_pil.op_params("Rotate", 360.0, 20, 30)  # 360 % 360 == 0: Pillow's copy
    assert ip == ra_pil.SCALE_PATH and f[:4].tolist() == [1.0, 0.0, 1.0, 0.0]
    ip, f = ra_pil.op_params("Rotate", 30.0, 20, 30)
    q = f[:6].view(np.int32)
    assert ip == 0 and q[0] == q[4] == 56756 and q[1] == -q[3] == -32768  # fix16(cos 30), fix16(+-sin 30)
    # beyond Pillow's fixed-point range it accumulates in double, in order: refused
    with pytest.raises(ValueError, match="fixed-point range"):
        ra_pil.op_params("Rotate", 20.0, 40000, 40000)
    # Solarize's integer threshold: not i < 119.5 -> i >= 120; Posterize's mask
    assert ra_pil.op_params("Solarize", 119.5, 8, 8)[0] == 120
    assert ra_pil.op_params("Posterize", 3.0, 8, 8)[0] == 0xE0


def test_pil_semantics_is_accepted_and_unknown_refused():
    rec = P.empty(1)
    rec["ra_ops"][0, 0], rec["ra_mags"][0, 0] = RA_OPS.index("Rotate"), 9
    rai, raf = pack_ra(rec, (16, 16), ra_semantics="pil")
    assert rai.shape == (1, 1, 2) and int(rai[0, 0, 1]) == 0  # fixed point
    with pytest.raises(ValueError, match="ra_semantics"):
        pack_ra(rec, (16, 16), ra_semantics="pil12")
    # timm's semantics takes timm's ops with their levels (tests/test_ra_golden_triton_timm.py)
    with pytest.raises(ValueError, match="not a timm op"):
        pack_ra(rec, (16, 16), ra_semantics="timm")
