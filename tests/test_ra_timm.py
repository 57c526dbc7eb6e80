"""timm's RandAugment (randaugment_semantics="timm") byte for byte against real timm.

tests/golden/ra_timm.npz was made by ``tests/golden/make_ra_golden.py timm`` with timm 1.0.31
and Pillow 13.0.0 (``versions`` in the file): every timm op x 11 levels x its draws (negation,
BILINEAR/BICUBIC) plus Rotate's 90/180/270-degree transposes and 48 chains, on the 5 sweep
images (odd, non-square, 512x683), through timm's own ``AugmentOp``. Stored as 16-byte digests
of every output, every output of the smallest image and a sample of the next one. These tests
need no timm.
"""
import ctypes
import os

import numpy as np
import pytest

from fastload import _native
from fastload.sample import schema as S

from test_ra_golden import _digest, sweep_image

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ra_timm.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        z = {k: f[k] for k in f.files}
    names = tuple(str(x) for x in z["op_names"])
    ids = np.array([S.RA_OP_ID["Timm" + n] for n in names] + [S.RA_NONE] * (256 - len(names)), np.uint8)
    ops = np.where(z["ops"] == S.RA_NONE, S.RA_NONE, ids[np.minimum(z["ops"], len(names))]).astype(np.uint8)
    imgs = []
    for n, (h, w) in enumerate(z["sizes"]):
        img = sweep_image(int(h), int(w), n)
        assert _digest(img) == z[f"input_digest{n}"].tobytes(), f"sweep image {n} differs from the script's"
        imgs.append(img)
    return z, ops, imgs


@pytest.fixture(scope="module")
def lib():
    lib = _native.load("replay")
    vp = ctypes.c_void_p
    lib.fl_ra_timm_u8.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp, vp, vp, ctypes.c_int, vp]
    lib.fl_ra_timm_u8.restype = ctypes.c_int
    return lib


def run_cpp(lib, img_chw, ops, draws, levels, fill):
    hwc = np.ascontiguousarray(np.transpose(img_chw, (1, 2, 0)))
    o = np.ascontiguousarray(ops, np.uint8)
    m = np.ascontiguousarray(draws, np.int8)
    v = np.ascontiguousarray(levels, np.float32)
    f = np.ascontiguousarray(fill, np.uint8)
    st = lib.fl_ra_timm_u8(_native.ptr(hwc), hwc.shape[0], hwc.shape[1], _native.ptr(o), _native.ptr(m),
                           _native.ptr(v), len(o), _native.ptr(f))
    _native.check(lib, st, "fl_ra_timm_u8")
    return np.transpose(hwc, (2, 0, 1))


def _label(z, i):
    return "+".join(f"{z['op_names'][o]}({lv:g}{'-' if d < 0 else ''}{'C' if abs(d) == 2 else ''})"
                    for o, lv, d in zip(z["ops"][i], z["levels"][i], z["draws"][i]) if o != S.RA_NONE)


def test_golden_covers_every_op_level_draw_and_size(golden):
    z, ops, imgs = golden
    sizes = [tuple(int(v) for v in s) for s in z["sizes"]]
    assert len(sizes) >= 5 and any(h % 2 and w % 2 for h, w in sizes) and any(h != w for h, w in sizes)
    assert max(max(s) for s in sizes) >= 512
    assert {"Timm" + str(n) for n in z["op_names"]} == {n for _, n, _, f in S.RA_OP_TABLE if f == "timm"}
    singles = [i for i in range(len(ops)) if ops[i, 1] == S.RA_NONE]
    per_op = {}
    for i in singles:
        per_op.setdefault(S.RA_OPS[ops[i, 0]], set()).add((float(z["levels"][i, 0]), int(z["draws"][i, 0])))
    for name, cases in per_op.items():
        if name in ("TimmAutoContrast", "TimmEqualize", "TimmInvert"):
            continue
        assert len({lv for lv, _ in cases}) >= 11, name
        if name in S.RA_SIGNED:
            assert {d for _, d in cases} & {-1, -2}, name
        if name[4:] in S.TIMM_GEOMETRIC:
            assert {abs(d) for _, d in cases} == {1, 2}, name
    # the only cases real timm refuses: posterize to 0 bits (Pillow >= 11 raises)
    for n in range(len(imgs)):
        raised = z[f"timm_raised{n}"]
        assert raised.any()
        assert all("Posterize" in _label(z, i) for i in np.flatnonzero(raised))


def test_native_kernel_matches_timm(golden, lib):
    z, ops, imgs = golden
    bad, n_cases = [], 0
    for n, img in enumerate(imgs):
        dig, raised = z[f"timm_digest{n}"], z[f"timm_raised{n}"]
        for i in range(len(ops)):
            if raised[i]:
                continue
            n_cases += 1
            got = run_cpp(lib, img, ops[i], z["draws"][i], z["levels"][i], z["fill"])
            if _digest(got) != dig[i].tobytes():
                bad.append((img.shape[1:], _label(z, i)))
    assert n_cases > 2000
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


def _reference_vs_golden(z, ops, imgs, sizes):
    import torch

    from fastload.replay.reference_ra import apply_timm

    bad, n_cases = [], 0
    for n in sizes:
        img = torch.from_numpy(imgs[n])
        dig, raised = z[f"timm_digest{n}"], z[f"timm_raised{n}"]
        for i in range(len(ops)):
            if raised[i]:
                continue
            n_cases += 1
            got = apply_timm(img, ops[i], z["draws"][i], z["levels"][i], tuple(z["fill"])).numpy()
            if _digest(got) != dig[i].tobytes():
                bad.append((imgs[n].shape[1:], _label(z, i)))
    return bad, n_cases


def test_reference_matches_timm_small_sizes(golden):
    z, ops, imgs = golden
    small = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] <= 64 * 64]
    bad, n_cases = _reference_vs_golden(z, ops, imgs, small)
    assert n_cases > 800
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


@pytest.mark.slow
def test_reference_matches_timm_large_sizes(golden):
    z, ops, imgs = golden
    large = [n for n, img in enumerate(imgs) if img.shape[1] * img.shape[2] > 64 * 64]
    bad, n_cases = _reference_vs_golden(z, ops, imgs, large)
    assert not bad, f"{len(bad)} of {n_cases} cases differ from timm: {bad[:10]}"


def test_posterize_to_zero_bits_clears_as_older_pillow(golden, lib):
    # the one case real timm (Pillow >= 11) refuses, replayed as Pillow < 11 computed it
    z, ops, imgs = golden
    i = next(i for i in range(len(ops)) if z["timm_raised0"][i])
    got = run_cpp(lib, imgs[0], ops[i], z["draws"][i], z["levels"][i], z["fill"])
    assert not got.any()


def test_stored_arrays_are_the_digested_outputs(golden):
    z, ops, imgs = golden
    every = int(z["sample_every"])
    seen = 0
    for n in range(len(imgs)):
        arr, idx = z.get(f"timm_out{n}"), list(range(len(ops)))
        if arr is None:
            if f"timm_sample{n}" not in z:
                continue
            arr, idx = z[f"timm_sample{n}"], idx[::every]
        assert len(arr) == len(idx)
        for a, i in zip(arr, idx):
            assert _digest(a) == z[f"timm_digest{n}"][i].tobytes()
            seen += 1
    assert seen > len(ops)


def test_bad_timm_records_are_refused(lib):
    img = np.zeros((3, 8, 8), np.uint8)
    fill = np.array([1, 2, 3], np.uint8)
    tv_shear = S.RA_OP_ID["ShearX"]
    with pytest.raises(RuntimeError, match="not a timm op"):
        run_cpp(lib, img, [tv_shear], [1], [5.0], fill)
    with pytest.raises(RuntimeError, match="outside"):
        run_cpp(lib, img, [S.RA_OP_ID["TimmRotate"]], [1], [float("nan")], fill)
    with pytest.raises(RuntimeError, match="draw code"):
        run_cpp(lib, img, [S.RA_OP_ID["TimmRotate"]], [0], [5.0], fill)


# --------------------------------------------------------------------------- the policy
def test_timm_config_parsing():
    from fastload.sample.policy import TimmRandAugment, parse_timm_config

    c = parse_timm_config("rand-m9-mstd0.5-inc1")
    assert c == TimmRandAugment(m=9, n=2, p=0.5, mstd=0.5, mmax=None, inc=True)
    assert c.ops[4] == "PosterizeIncreasing" and c.upper == 10.0
    c = parse_timm_config("rand-n3-m15-mmax20-p1.0-mstd101")
    assert (c.n, c.m, c.mmax, c.p, c.upper, c.inc) == (3, 15, 20, 1.0, 20.0, False) and c.mstd == float("inf")
    assert parse_timm_config("rand") == TimmRandAugment()
    for bad, msg in (("rand-m9-tweights", "transform set 'weights'"), ("rand-w0", "'w'"),
                     ("rand-m9-q3", "key 'q'"), ("rand-mstd", "'mstd' not understood"),
                     ("augmix-m5", "must start with 'rand'"), ("rand-n5", "1..4"), ("rand-mx9", "'mx' not"),
                     ("rand-m9-m8", "twice"), ("rand-p0.5.1", "value '0.5.1'"), ("rand-mmax200", "0..100")):
        with pytest.raises(ValueError, match=msg):
            parse_timm_config(bad)


def test_policy_accepts_timm_and_round_trips():
    from fastload.sample.policy import AugmentPolicy

    p = AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9-mstd0.5-inc1", timm_fill=[0, 1, 2],
                      timm_interpolation="bicubic")
    assert AugmentPolicy.from_dict(p.to_dict()) == p
    assert p.timm.m == 9 and p.timm_fill == (0, 1, 2)
    d = AugmentPolicy().to_dict()  # without timm: no timm keys (older fastload reads the manifest)
    assert not {"timm_config", "timm_fill", "timm_interpolation"} & set(d)
    assert AugmentPolicy.from_dict(d) == AugmentPolicy()
    assert {"timm_config", "timm_fill", "timm_interpolation"} <= set(p.to_dict())
    with pytest.raises(ValueError, match="needs timm_config"):
        AugmentPolicy(randaugment_semantics="timm")
    with pytest.raises(ValueError, match="comes? from timm_config"):
        AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9", randaugment=(2, 9))
    with pytest.raises(ValueError, match="set randaugment_semantics='timm'"):
        AugmentPolicy(timm_config="rand-m9")
    with pytest.raises(ValueError, match="section 'x1'"):
        AugmentPolicy(randaugment_semantics="timm", timm_config="rand-x1")
    with pytest.raises(ValueError, match="timm_fill"):
        AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9", timm_fill=(0, 0, 256))
    with pytest.raises(ValueError, match="timm_interpolation"):
        AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9", timm_interpolation="nearest")


def test_sampled_timm_draws_follow_the_config():
    from fastload.sample.policy import AugmentPolicy, sample_params, sample_records

    pol = AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9-mstd0.5-inc1", size=(32, 32))
    hw = np.array([[60, 80]] * 50)
    rec, ext = sample_records(pol, np.random.default_rng(0), np.arange(50), hw, 200)
    rec, ext = rec.reshape(-1), ext.reshape(-1)
    assert (ext["ext"] & 1).all()  # ra_float
    ops, mags, vals = rec["ra_ops"], rec["ra_mags"], ext["ra_vals"]
    assert (ops[:, 2:] == S.RA_NONE).all()
    used = ops[:, :2] != S.RA_NONE
    assert abs(used.mean() - 0.5) < 0.01  # p 0.5 per op
    inc_ids = {S.RA_OP_ID["Timm" + n] for n in S.TIMM_RAND_INCREASING_OPS}
    assert set(np.unique(ops[:, :2][used]).tolist()) == inc_ids  # uniform over the increasing set
    lv = vals[:, :2][used]
    assert lv.dtype == np.float32 and lv.min() >= 0 and lv.max() == 10.0
    assert abs(lv.mean() - 9.0) < 0.02 and abs((lv == 10.0).mean() - 0.0228) < 0.003  # N(9, 0.5) clipped at 10
    d = mags[:, :2][used]
    o = ops[:, :2][used]
    neg_ok = np.array([S.RA_OPS[k] in S.RA_SIGNED for k in o])
    geo = np.array([S.RA_OPS[k][4:] in S.TIMM_GEOMETRIC for k in o])
    assert (d[~neg_ok] > 0).all() and abs((d[neg_ok] < 0).mean() - 0.5) < 0.02
    assert (np.abs(d[~geo]) == 1).all() and abs((np.abs(d[geo]) == 2).mean() - 0.5) < 0.02
    with pytest.raises(ValueError, match="sample_records"):
        sample_params(pol, np.random.default_rng(0), [0], hw, 1)
    # p1, fixed magnitude, fixed resampling
    pol = AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m7-n3-p1.0", timm_interpolation="bilinear")
    rec, ext = sample_records(pol, np.random.default_rng(1), np.arange(5), hw[:5], 40)
    rec, ext = rec.reshape(-1), ext.reshape(-1)
    assert (rec["ra_ops"][:, :3] != S.RA_NONE).all() and (ext["ra_vals"][:, :3] == 7.0).all()
    assert (np.abs(rec["ra_mags"][:, :3]) == 1).all()


def timm_dataset(tmp_path, config: str, size: int, num_augmentations: int):
    """(policy, path): 6 demo images reinforced with timm's RandAugment ``config`` at ``size``,
    fill colour (10, 200, 30) (also used by tests/test_device_replay.py)."""
    import fastload
    from fastload.datasets import make_images, make_teacher
    from fastload.sample.policy import AugmentPolicy

    root = str(tmp_path / "imgs")
    make_images(root, 6)
    pol = AugmentPolicy(randaugment_semantics="timm", timm_config=config, size=(size, size),
                        timm_fill=(10, 200, 30))
    out = str(tmp_path / "ds")
    fastload.reinforce(root, make_teacher(20), out, num_classes=20, num_augmentations=num_augmentations, topk=3,
                       policy=pol, image_size=size, batch_size=8, shard_size=4, seed=5, progress=False)
    return pol, out


def test_reinforce_records_timm_draws_and_the_loader_replays_them(tmp_path):
    import torch

    import fastload
    from fastload.replay.native import render_batch

    pol, out = timm_dataset(tmp_path, "rand-m9-mstd0.5-inc1-p0.9", 40, 6)
    ds = fastload.ReinforcedDataset(out, verify=True)
    assert ds.policy == pol and ds.has_ext
    recs = np.concatenate([ds.augs(i) for i in range(len(ds))])
    exts = np.concatenate([ds.augs_ext(i) for i in range(len(ds))])
    assert (recs["ra_ops"][:, :2] >= S.RA_OP_ID["TimmAutoContrast"]).any() and (exts["ra_vals"] > 0).any()
    # the stored draws replay exactly: render without RandAugment, apply the reference's timm
    # ops on top, compare with the replay of the full record (uint8, no normalization)
    from fastload.replay.reference_ra import apply_timm

    n_ra, renders = 0, {}
    for i in range(len(ds)):
        b, recs_i, ext_i = bytes(ds.image_bytes(i)), ds.augs(i), ds.augs_ext(i)
        plain = recs_i.copy()
        plain["ra_ops"] = S.RA_NONE
        kw = dict(interpolation=ds.replay["interpolation"], dct_scale=ds.replay["dct_scale"], threads=1)
        base = torch.empty(len(recs_i), 3, 40, 40, dtype=torch.uint8)
        render_batch([b] * len(recs_i), plain, base, **kw)
        got = torch.empty_like(base)
        render_batch([b] * len(recs_i), recs_i, got, ra_semantics="timm", ext=ext_i, ra_fill=pol.timm_fill, **kw)
        renders[i] = got
        for j in range(len(recs_i)):
            want = apply_timm(base[j], recs_i[j]["ra_ops"], recs_i[j]["ra_mags"], ext_i[j]["ra_vals"], pol.timm_fill)
            assert torch.equal(got[j], want), (i, j, recs_i[j]["ra_ops"])
            n_ra += int((recs_i[j]["ra_ops"] != S.RA_NONE).any())
    assert n_ra > 10
    with pytest.raises(ValueError, match="need their levels"):  # timm records without their extension
        render_batch([b], recs_i[:1], got[:1], ra_semantics="timm", **kw) if recs_i[0]["ra_ops"][0] != 255 \
            else render_batch([b], recs_i[[int(np.flatnonzero(recs_i["ra_ops"][:, 0] != 255)[0])]], got[:1],
                              ra_semantics="timm", **kw)
    # the export names timm's ops and gives their levels
    import pyarrow.parquet as pq

    from fastload.tools.export import export_params

    assert export_params(ds, str(tmp_path / "p.parquet"), progress=False) == len(ds) * 6
    t = pq.read_table(str(tmp_path / "p.parquet"))
    names = [n for row in t.column("ra_ops").to_pylist() for n in row]
    assert names and all(n.startswith("Timm") for n in names)
    levels = [v for row in t.column("ra_values").to_pylist() if row for v in row]
    assert len(levels) == len(names) and all(0.0 <= v <= 10.0 for v in levels)
    # and the loader replays with the dataset's semantics and fill: each row is one of its image's renders
    loader = fastload.ReinforcedLoader(ds, batch_sampler=[list(range(len(ds)))], image_size=40, dtype=torch.uint8)
    x = next(iter(loader))[0]
    assert x.shape == (len(ds), 3, 40, 40)
    for i in range(len(ds)):
        assert any(torch.equal(x[i], renders[i][j]) for j in range(len(renders[i]))), i


def test_cli_reinforce_with_timm_randaugment(tmp_path, capsys):
    import fastload
    from fastload.datasets import make_images, make_teacher
    from fastload.generate import main
    from fastload.sample.policy import AugmentPolicy

    root = str(tmp_path / "imgs")
    make_images(root, 3)
    ts = str(tmp_path / "t.pt2")
    fastload.export_teacher(make_teacher(20), 32, ts)
    base = [root, "--teacher", ts, "--num-classes", "20", "--num-augmentations", "2", "--topk", "2",
            "--image-size", "32", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "o"), "--timm-randaugment", "rand-m9-mstd0.5-inc1"]) == 0
    ds = fastload.ReinforcedDataset(str(tmp_path / "o"))
    assert ds.policy.randaugment_semantics == "timm" and ds.policy.timm_config == "rand-m9-mstd0.5-inc1"
    assert ds.policy == AugmentPolicy.from_dict(ds.policy.to_dict())
    assert main(base + ["--out", str(tmp_path / "o2"), "--timm-randaugment", "rand-m9-tweights"]) == 2
    assert "transform set 'weights'" in capsys.readouterr().err
