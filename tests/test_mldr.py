"""import-mldr: archives in apple/ml-dr's layout (fastload.bench.mldr_layout writes them) for
each published ImageNet+ variant, imported and checked field by field, replayed against an
implementation of ml-dr's replay semantics written here, and the loader's safety."""
import io
import os
import pickle
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastload.bench import mldr_layout as L
from fastload.importers import mldr
from fastload.format.reader import ReinforcedDataset
from fastload.losses import densify
from fastload.replay.reference import crop_resize_flip, render_reference
from fastload.replay.reference_ra import apply_op
from fastload.sample import params as P

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
SIZE = 32


def _setup(tmp_path, variant, fmt="tar", n=7, num_samples=4, topk=3, classes=5, jb=False, compress=True,
           float_mags=False, empty_cutmix_ids=(), seed=0):
    imgs = str(tmp_path / "imgs")
    hw = L.write_image_folder(imgs, n, classes=classes, seed=seed)
    cfg = L.make_config(variant, num_samples, topk, classes, size=SIZE, compress=compress, joblib=jb)
    arch = str(tmp_path / {"tar": "a.tar", "tar.gz": "a.tar.gz", "dir": "a"}[fmt])
    written = L.write_archive(arch, hw, cfg, seed=seed, fmt=fmt, float_mags=float_mags,
                              empty_cutmix_ids=empty_cutmix_ids)
    return imgs, hw, cfg, arch, written


def _unpack(params, cfg):
    """ml-dr's decompress, written here from the layout description (test oracle)."""
    aug = {k: v for k, v in cfg["reinforce"]["image_augmentation"].items() if v.get("enable", True)}
    names = [t for t in L.ORDER if t in aug]
    if isinstance(params, dict):
        d = {t: params[t] for t in names if t not in L.NO_PARAM}
        d["id2"] = params.get("id2")
        d = {t: v for t, v in d.items() if v is not None}
        if "rand_augment" in d:
            d["rand_augment"] = tuple([(L.RA_NAMES.index(o), m) for o, m in x] for x in d["rand_augment"])
        if d.get("mixup") is None and d.get("cutmix") is None:
            d["id2"] = None
        return d
    mixing = "mixup" in aug or "cutmix" in aug
    d = {"id2": params[0] if mixing else None}
    rest = params[1:] if mixing else params
    for p, t in zip(rest, [t for t in names if t not in L.NO_PARAM]):
        if p is None:
            continue
        if t in ("mixup", "cutmix"):
            d[t] = p if t == "mixup" else (p[0], tuple(p[1:]))
        elif d["id2"] is not None:
            d[t] = (p[0], p[1])
        else:
            d[t] = (p, None)
    return d


def _check_mags(mags, vals, ext, stored):
    """The stored float magnitudes come back exactly: from the bins, or from the floats."""
    from fastload.replay.reference_ra import magnitude_value

    for k, (o, mm) in enumerate(stored):
        if ext & P.EXT_RA_FLOAT:
            assert vals[k] == np.float32(mm)
        else:
            got = magnitude_value(L.RA_NAMES[o], int(mags[k]), 31, SIZE, SIZE)
            assert got == mm or (got == 0.0 and mm == 0.0)


def _decode(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mldr_replay(u, crop_u8, pcrop_u8):
    """ml-dr's reapply after the crop/flip (given the same crops): RandAugment with the
    stored float magnitudes, ToTensor, erase to 0 (black) before Normalize, Normalize,
    MixUp, CutMix; the partner gets its own RandAugment and erasing."""
    def rest(y, side):
        ra = u.get("rand_augment")
        if ra is not None and ra[side] is not None:
            for o, m in ra[side]:
                y = apply_op(y, L.RA_NAMES[o], m)
        x = y.float() / 255
        er = u.get("random_erase")
        if er is not None and er[side] is not None:
            i, j, h, w = er[side]
            x[:, i:i + h, j:j + w] = 0
        return (x - MEAN) / STD

    x = rest(crop_u8, 0)
    if u.get("id2") is None:
        return x
    x2 = rest(pcrop_u8, 1)
    if u.get("mixup") is not None:
        lam = u["mixup"]
        x = lam * x + (1 - lam) * x2
    if u.get("cutmix") is not None:
        x1, y1, xx2, y2 = (int(v) for v in u["cutmix"][1])
        x = x.clone()
        x[:, x1:xx2, y1:y2] = x2[:, x1:xx2, y1:y2]
    return x


@pytest.mark.parametrize("variant,fmt,jb,compress", [
    ("rrc", "tar", False, True), ("mix", "tar.gz", False, True), ("rare", "dir", True, True),
    ("mix_rare", "tar", False, True), ("mix_rare", "tar.gz", True, False)])
def test_import_variants_field_by_field(tmp_path, variant, fmt, jb, compress):
    imgs, hw, cfg, arch, written = _setup(tmp_path, variant, fmt, jb=jb, compress=compress,
                                          empty_cutmix_ids=(2,) if "mix" in variant else ())
    m = mldr.import_mldr(arch, imgs, str(tmp_path / "out"), shard_size=3, progress=False)
    assert m["schema_version"] == 2 and m["num_rows"] == len(hw)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    assert ds.has_ext and ds.num_augmentations == 4 and ds.topk == 3
    files, labels, _ = mldr.image_folder(imgs)
    seen_partner_ra = seen_empty = 0
    for i in range(len(hw)):
        assert ds.keys[i] == files[i] and ds.labels[i] == labels[i]
        recs, ext = ds.augs(i), ds.augs_ext(i)
        for a, s in enumerate(written[i]):
            u, r, e = _unpack(s["params"], cfg), recs[a], ext[a]
            H, W = hw[i]
            assert P.box_to_pixels(r["crop"], H, W) == tuple(u["random_resized_crop"][0])
            assert bool(r["flags"] & P.FLAG_FLIP) == bool(u["random_horizontal_flip"][0])
            ra = u.get("rand_augment")
            if ra is not None:
                ops = [int(o) for o in r["ra_ops"] if o != P.RA_NONE]
                assert ops == [o for o, _ in ra[0]]
                _check_mags(r["ra_mags"], e["ra_vals"], e["ext"], ra[0])
            else:
                assert (r["ra_ops"] == P.RA_NONE).all()
            er = u.get("random_erase")
            if er is not None and er[0] is not None:
                assert P.box_to_pixels(r["erase"], SIZE, SIZE) == tuple(er[0])
                assert e["ext"] & P.EXT_ERASE_BLACK
            else:
                assert r["erase"][3] == 0
            if u.get("id2") is None:
                assert r["partner"] == -1
                assert not r["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX)
                continue
            p = u["id2"]
            assert r["partner"] == p
            assert P.box_to_pixels(r["pcrop"], *hw[p]) == tuple(u["random_resized_crop"][1])
            assert bool(r["flags"] & P.FLAG_PARTNER_FLIP) == bool(u["random_horizontal_flip"][1])
            if ra is not None:
                pops = [int(o) for o in e["pra_ops"] if o != P.RA_NONE]
                assert pops == [o for o, _ in ra[1]]
                _check_mags(e["pra_mags"], e["pra_vals"], e["ext"], ra[1])
                seen_partner_ra += 1
            if u.get("mixup") is not None:
                assert r["flags"] & P.FLAG_MIXUP and e["mixup_f"] == u["mixup"]
            cut = u.get("cutmix")
            if cut is not None:
                x1, y1, x2, y2 = (int(v) for v in cut[1])
                assert e["cutmix_lam"] == cut[0]
                if x2 > x1 and y2 > y1:
                    assert P.box_to_pixels(r["cutmix"], SIZE, SIZE) == (x1, y1, x2 - x1, y2 - y1)
                else:
                    assert not r["flags"] & P.FLAG_CUTMIX and e["ext"] & P.EXT_CUTMIX_EMPTY
                    seen_empty += 1
            # targets: the same (id, prob) pairs, sorted descending, fp16 storage
            ids, probs = ds.target(i, a)
            pv, pi = s["prob"]
            want = sorted(zip(pv, pi), key=lambda t: -t[0])
            assert ids.tolist() == [t[1] for t in want]
            np.testing.assert_allclose(probs, [t[0] for t in want], rtol=1e-3)
    if variant == "mix_rare":
        assert seen_partner_ra > 0
    if "mix" in variant:
        assert seen_empty > 0


def test_replay_equals_mldr_semantics(tmp_path):
    """Crop/flip within 1 level of PIL (ml-dr's RandomResizedCrop on PIL images); after the
    same crop, RandAugment with float magnitudes, black erasing before Normalize, the
    partner's own RandAugment/erasing, MixUp and CutMix equal ml-dr's reapply."""
    imgs, hw, cfg, arch, written = _setup(tmp_path, "mix_rare", "tar", n=6, num_samples=12, float_mags=True,
                                          empty_cutmix_ids=(1,))
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    files, _, _ = mldr.image_folder(imgs)
    src = [_decode(os.path.join(imgs, f)) for f in files]
    checked = erased = floats = mixed = 0
    for i in range(len(hw)):
        recs, ext = ds.augs(i), ds.augs_ext(i)
        for a, s in enumerate(written[i]):
            u = _unpack(s["params"], cfg)
            r, e = recs[a], ext[a]
            # crop + resize + flip: ml-dr does it on PIL images
            ci, cj, ch, cw = u["random_resized_crop"][0]
            pil = Image.fromarray(src[i]).crop((cj, ci, cj + cw, ci + ch)).resize((SIZE, SIZE), Image.BILINEAR)
            if u["random_horizontal_flip"][0]:
                pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
            ours = crop_resize_flip(src[i], r["crop"], (SIZE, SIZE), bool(r["flags"] & P.FLAG_FLIP))
            theirs = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
            assert (ours.int() - theirs.int()).abs().max() <= 1
            # the rest, given the same crops
            p = int(r["partner"])
            pc = None
            if p >= 0:
                pc = crop_resize_flip(src[p], r["pcrop"], (SIZE, SIZE), bool(r["flags"] & P.FLAG_PARTNER_FLIP))
            want = _mldr_replay(u, ours, pc)
            # the reference renders its own crops: give it pre-cropped images (identity box)
            got = render_reference(ours.permute(1, 2, 0).numpy(), _full(r), (SIZE, SIZE),
                                   None if pc is None else pc.permute(1, 2, 0).numpy(), ext=e,
                                   box_grid=(SIZE, SIZE))
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
            checked += 1
            erased += r["erase"][3] != 0 or e["perase"][3] != 0
            floats += bool(e["ext"] & P.EXT_RA_FLOAT)
            mixed += p >= 0
    assert checked == 6 * 12 and erased > 0 and floats > 0 and mixed > 0


def _full(r):
    r = r.copy()
    r["crop"] = (0, 0, P.Q, P.Q)
    r["flags"] &= ~np.uint8(P.FLAG_FLIP)
    if r["partner"] >= 0:
        r["pcrop"] = (0, 0, P.Q, P.Q)
        r["flags"] &= ~np.uint8(P.FLAG_PARTNER_FLIP)
    return r


def test_black_erase_differs_from_mean_fill():
    """The extension's fill convention is what changes the pixels (mean colour vs black)."""
    img = np.full((8, 8, 3), 200, np.uint8)
    r = P.empty(())
    r["erase"] = P.pixels_to_box(0, 0, 4, 4, 8, 8)
    e = P.empty_ext(())
    mean_fill = render_reference(img, r, (8, 8))
    e["ext"] = P.EXT_ERASE_BLACK
    black = render_reference(img, r, (8, 8), ext=e)
    assert float(mean_fill[:, 0, 0].abs().max()) == 0.0
    torch.testing.assert_close(black[:, 0, 0], (-MEAN / STD)[:, 0, 0])
    assert torch.equal(black[:, 5:, 5:], mean_fill[:, 5:, 5:])


def test_targets_equal_mldr_densify(tmp_path):
    imgs, hw, cfg, arch, written = _setup(tmp_path, "rrc", "tar", topk=4, classes=6)
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    worst_vs_zeros = 0.0
    for i in range(len(hw)):
        for a, s in enumerate(written[i]):
            pv, pi = s["prob"]
            # ml-dr's densify "zeros": softmax over the top-k values at their ids
            want = torch.zeros(6)
            want[pi] = torch.softmax(torch.tensor(pv), 0)
            ids, probs = ds.target(i, a)
            got = densify(torch.from_numpy(ids)[None], torch.from_numpy(probs)[None], 6, mode="mldr")[0]
            torch.testing.assert_close(got, want, atol=5e-4, rtol=0)  # fp16 storage: half an ulp at 1 is 2.4e-4
            z = densify(torch.from_numpy(ids)[None], torch.from_numpy(probs)[None], 6, mode="zeros")[0]
            worst_vs_zeros = max(worst_vs_zeros, float((z - want).abs().max()))
            # ml-dr's "smooth": the rest spread evenly; softmax when the top-k sum exceeds 1
            r = 1.0 - torch.tensor(pv).sum()
            sm = torch.full((6,), float(r) / 2) if r >= 0 else want
            if r >= 0:
                sm[pi] = torch.tensor(pv)
            got = densify(torch.from_numpy(ids)[None], torch.from_numpy(probs)[None], 6, mode="mldr_smooth")[0]
            torch.testing.assert_close(got, sm, atol=5e-4, rtol=0)
    assert worst_vs_zeros > 0.05  # the two rules differ: the name matters


def test_densify_mldr_smooth_falls_back_to_softmax():
    ids, probs = torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.31]])  # sums to 1.01
    got = densify(ids, probs, 4, mode="mldr_smooth")
    want = torch.zeros(1, 4)
    want[0, :2] = torch.softmax(probs[0], 0)
    torch.testing.assert_close(got, want)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fastload_mldr_pwned",))


def _marker():
    return "/tmp/fastload_mldr_pwned"


@pytest.mark.parametrize("kind", ["jb", "jb_gzip", "pth4", "pth2"])
def test_malicious_files_raise_without_running(kind, tmp_path):
    if os.path.exists(_marker()):
        os.remove(_marker())
    payload = (0, [{"params": _Boom(), "prob": ([1.0], [0])}])
    if kind == "jb":
        data, load = zlib.compress(pickle.dumps(payload, protocol=4)), mldr.load_jb
    elif kind == "jb_gzip":
        import gzip

        data, load = gzip.compress(pickle.dumps(payload, protocol=2)), mldr.load_jb
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:  # torch's zip layout with a hostile data.pkl
            z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=4 if kind == "pth4" else 2))
            z.writestr("archive/version", "3\n")
        data, load = buf.getvalue(), mldr.load_pth
    with pytest.raises(pickle.UnpicklingError, match="system|posix|weights_only|refus"):
        load(data, "evil")
    assert not os.path.exists(_marker())
    # and through the importer: the archive's file is named in the error
    imgs = str(tmp_path / "imgs")
    hw = L.write_image_folder(imgs, 2, classes=2)
    cfg = L.make_config("rrc", 1, 1, 2, size=SIZE)
    arch = tmp_path / "a.tar"
    with tarfile.open(arch, "w") as tf:
        for name, b in (("reinforced_data/config.pth.tar", L.torch_bytes(cfg, None)),
                        (f"reinforced_data/0.{'jb' if kind.startswith('jb') else 'pth.tar'}", data)):
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    with pytest.raises(pickle.UnpicklingError, match="reinforced_data/0"):
        mldr.import_mldr(str(arch), imgs, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(_marker())


def test_joblib_numpy_arrays_read_without_joblib_globals():
    """joblib's inline-array format (NumpyArrayWrapper + raw bytes), as joblib itself writes it."""
    import joblib  # in the "test" extra: real joblib output, read without its globals
    obj = (3, [{"a": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.eye(3)),
                "s": np.int64(7), "e": np.zeros(0, np.int16)}])
    for compress in (True, False, ("gzip", 3)):
        buf = io.BytesIO()
        joblib.dump(obj, buf, compress=compress)
        got = mldr.load_jb(buf.getvalue(), "t.jb")
        assert got[0] == 3
        for k, v in obj[1][0].items():
            np.testing.assert_array_equal(got[1][0][k], v)
            assert got[1][0][k].dtype == np.asarray(v).dtype
    samples = L.make_samples(np.random.default_rng(0), 0, [(40, 50), (30, 60)],
                             L.make_config("mix_rare", 3, 2, 5, size=SIZE))
    buf = io.BytesIO()
    joblib.dump((0, samples), buf, compress=True)  # what ml-dr's reinforce.joblib=true writes
    assert mldr.load_jb(buf.getvalue(), "0.jb") == (0, samples)
    buf = io.BytesIO()
    joblib.dump(np.array([object()], dtype=object), buf)
    with pytest.raises(pickle.UnpicklingError):
        mldr.load_jb(buf.getvalue(), "obj.jb")


def test_pth_numpy_scalars_and_protocol2(tmp_path):
    """ml-dr's CutMix boxes are numpy ints: admitted (protocol 4 and torch.load's protocol 2)."""
    obj = (1, [{"params": [None, np.int64(5), np.float32(0.5)], "prob": ([0.5], [1])}])
    for proto in (4, 2):
        got = mldr.load_pth(L.torch_bytes(obj, proto))
        assert got[1][0]["params"][1] == 5 and type(got[1][0]["params"][1]) is np.int64


def test_resume_after_interruption(tmp_path, monkeypatch):
    imgs, hw, cfg, arch, _ = _setup(tmp_path, "mix_rare", "tar.gz", n=8)
    out = str(tmp_path / "out")
    import fastload.format.writer as W

    calls = {"n": 0}
    orig = W.write_shard_file

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return orig(*a, **k)

    monkeypatch.setattr(W, "write_shard_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        mldr.import_mldr(arch, imgs, out, shard_size=3, progress=False)
    monkeypatch.setattr(W, "write_shard_file", orig)
    first = [s["index"] for s in __import__("json").load(open(os.path.join(out, "manifest.json")))["shards"]]
    assert len(first) == 1
    m = mldr.import_mldr(arch, imgs, out, shard_size=3, progress=False)
    assert m["complete"] and m["num_rows"] == 8 and not os.path.exists(os.path.join(out, ".mldr-staging"))
    mldr.import_mldr(arch, imgs, str(tmp_path / "ref"), shard_size=3, progress=False)
    a, b = ReinforcedDataset(out), ReinforcedDataset(str(tmp_path / "ref"))
    for i in range(8):
        assert a.augs(i).tobytes() == b.augs(i).tobytes()
        assert a.augs_ext(i).tobytes() == b.augs_ext(i).tobytes()
        assert bytes(a.image_bytes(i)) == bytes(b.image_bytes(i))


def test_bad_archives_name_the_problem(tmp_path):
    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rrc", "dir", n=4, classes=2, topk=2)
    os.remove(os.path.join(arch, "reinforced_data", "2.pth.tar"))
    with pytest.raises(ValueError, match=r"no reinforcement for 1 images, e.g. ids \[2\]"):
        mldr.import_mldr(arch, imgs, str(tmp_path / "o1"), progress=False)
    with open(os.path.join(arch, "reinforced_data", "2.pth.tar"), "wb") as f:
        f.write(L.torch_bytes((3, [])))
    with pytest.raises(ValueError, match="id 2.*expected \\(id, samples\\) with id 2"):
        mldr.import_mldr(arch, imgs, str(tmp_path / "o2"), progress=False)
    with pytest.raises(ValueError, match="5 class folders"):
        imgs2 = str(tmp_path / "imgs5")
        L.write_image_folder(imgs2, 5, classes=5)
        mldr.import_mldr(arch, imgs2, str(tmp_path / "o3"), progress=False)


def test_cli_import(tmp_path, capsys):
    from fastload.cli import main

    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rare", "tar", n=3, classes=3)
    assert main(["import-mldr", arch, "--images", imgs, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "imported 3 images x 4 augmentations" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "schema v2" in text and "extension records" in text
    assert main(["import-mldr", str(tmp_path / "nope.tar"), "--images", imgs, "--out", str(tmp_path / "o")]) == 2


def test_v1_dataset_written_by_main_still_reads():
    """tests/data/v1_dataset was written by the schema-v1 code (main before the extension)."""
    root = os.path.join(os.path.dirname(__file__), "data")
    ds = ReinforcedDataset(os.path.join(root, "v1_dataset"))
    exp = np.load(os.path.join(root, "v1_dataset_expected.npz"))
    assert ds.manifest["schema_version"] == 1 and not ds.has_ext
    for i in range(len(ds)):
        assert ds.augs(i).view(np.uint8).reshape(-1).tobytes() == exp["augs"][i].tobytes()
        ids, probs = ds._targets_row(i)
        assert np.array_equal(ids, exp["ids"][i]) and np.array_equal(probs, exp["probs"][i])
        e = ds.augs_ext(i)
        assert e.shape == (ds.num_augmentations,) and (e["ext"] == 0).all() and (e["pra_ops"] == P.RA_NONE).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_native_replay_of_extension_records_equals_reference(tmp_path, dtype):
    """The C++ kernel replays imported records (float magnitudes, black erasing, the
    partner's own RandAugment/erasing, empty CutMix) as the reference does, given the same
    crops (identity boxes on pre-cropped inputs make the resize exact)."""
    from fastload.replay import native

    imgs, hw, cfg, arch, written = _setup(tmp_path, "mix_rare", "tar", n=6, num_samples=12, float_mags=True,
                                          empty_cutmix_ids=(1,))
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    files, _, _ = mldr.image_folder(imgs)
    src = [_decode(os.path.join(imgs, f)) for f in files]
    recs, exts, crops, pcrops = [], [], [], []
    for i in range(len(hw)):
        for r, e in zip(ds.augs(i), ds.augs_ext(i)):
            crops.append(crop_resize_flip(src[i], r["crop"], (SIZE, SIZE), bool(r["flags"] & P.FLAG_FLIP))
                         .permute(1, 2, 0).contiguous().numpy())
            p = int(r["partner"])
            pcrops.append(None if p < 0 else crop_resize_flip(src[p], r["pcrop"], (SIZE, SIZE),
                                                              bool(r["flags"] & P.FLAG_PARTNER_FLIP))
                          .permute(1, 2, 0).contiguous().numpy())
            recs.append(_full(r))
            exts.append(e)
    recs, exts = np.array(recs, P.AUG_DTYPE), np.array(exts, P.AUG_EXT_DTYPE)
    assert (exts["ext"] & P.EXT_RA_FLOAT).any() and (exts["ext"] & P.EXT_PARTNER_AUG).any()
    assert (exts["perase"][:, 3] > 0).any() and (exts["ext"] & P.EXT_CUTMIX_EMPTY).any()
    out = torch.empty(len(recs), 3, SIZE, SIZE, dtype=dtype)
    native.render_batch(crops, recs, out, partner_sources=pcrops, ext=exts, box_grid=(SIZE, SIZE),
                        interpolation="bilinear")
    for k in range(len(recs)):
        if dtype == torch.uint8:
            if recs[k]["flags"] & (P.FLAG_MIXUP | P.FLAG_CUTMIX):
                continue  # uint8 output of mixed images is rounded; covered in float32
            from fastload.replay.reference import reference_uint8

            want = reference_uint8(crops[k], recs[k], (SIZE, SIZE), ext=exts[k], box_grid=(SIZE, SIZE))
            if recs[k]["erase"][3]:
                t, l, h, w = P.box_to_pixels(recs[k]["erase"], SIZE, SIZE)
                want[:, t:t + h, l:l + w] = 0  # black, in uint8 output
            assert torch.equal(out[k], want), k
        else:
            want = render_reference(crops[k], recs[k], (SIZE, SIZE), pcrops[k], ext=exts[k], box_grid=(SIZE, SIZE))
            torch.testing.assert_close(out[k], want, atol=1e-5, rtol=0, msg=f"record {k}")
    # without the extension the same records render differently (the fields matter)
    plain = torch.empty_like(out)
    native.render_batch(crops, recs, plain, partner_sources=pcrops, interpolation="bilinear")
    assert not torch.equal(plain, out)


def test_loader_replays_extension_records(tmp_path):
    """ReinforcedLoader over an imported dataset passes the extension records to the kernel
    (the batch equals a direct render with them and differs from one without)."""
    from fastload.loader.reinforced import ReinforcedLoader
    from fastload.replay import native

    imgs, hw, cfg, arch, _ = _setup(tmp_path, "mix_rare", "tar", n=6, num_samples=2, float_mags=True)
    mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False)
    ds = ReinforcedDataset(str(tmp_path / "out"))
    loader = ReinforcedLoader(str(tmp_path / "out"), batch_size=6, shuffle=False, aug_choice="epoch",
                              image_size=SIZE, target_mode="mldr")
    batch = next(iter(loader))
    x, y = batch[0], batch[-1]  # (images, labels, dense targets)
    rows = np.arange(6)
    srcs = [bytes(ds.image_bytes(i)) for i in rows]
    recs = np.concatenate([ds.augs(i)[:1] for i in rows])
    ext = np.concatenate([ds.augs_ext(i)[:1] for i in rows])
    assert ext["ext"].any()
    partners = [bytes(ds.image_bytes(int(p))) if p >= 0 else None for p in recs["partner"]]
    kw = dict(partner_sources=partners, mean=loader.mean, std=loader.std, interpolation=loader.interpolation,
              dct_scale=loader.dct_scale, resize=ds.policy.resize)
    want = native.render_batch(srcs, recs, torch.empty(6, 3, SIZE, SIZE), ext=ext, box_grid=(SIZE, SIZE), **kw)
    torch.testing.assert_close(x, want, atol=0, rtol=0)
    plain = native.render_batch(srcs, recs, torch.empty(6, 3, SIZE, SIZE), **kw)
    assert not torch.equal(plain, want)
    ids, probs = zip(*[ds.target(i, 0) for i in rows])
    torch.testing.assert_close(y, densify(torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(probs)), 5,
                                          mode="mldr"))


def test_ext_blob_roundtrip_and_corruption():
    from fastload.format.record_ext import decode_ext, encode_ext

    e = P.empty_ext(5)
    assert encode_ext(e) == b"" and decode_ext(b"", expected_n=5).tobytes() == e.tobytes()
    e["ext"][2] = P.EXT_RA_FLOAT
    e["ra_vals"][2] = (0.5, -3.25, 0, 0)
    blob = encode_ext(e)
    assert decode_ext(blob, expected_n=5).tobytes() == e.tobytes()
    with pytest.raises(ValueError, match="expected 4 records"):
        decode_ext(blob, expected_n=4)
    with pytest.raises(ValueError, match="corrupt"):
        decode_ext(blob[:-3], expected_n=5)
    bad = bytearray(blob)
    bad[8:12] = (10 ** 9).to_bytes(4, "little")  # announces a huge raw size
    with pytest.raises(ValueError, match="corrupt"):
        decode_ext(bytes(bad), expected_n=5)


# --------------------------------------------------------------------------- importer hardening


class _Alloc:
    """A pickle whose only content is a call that allocates by argument."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _np_reconstruct_fn():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_BIG = 1 << 26  # 64 MiB: what the payload would make the importer allocate from ~100 bytes


@pytest.mark.parametrize("call", ["bytearray", "ndarray", "reconstruct"])
@pytest.mark.parametrize("kind", ["jb", "pth4", "pth2"])
def test_allow_list_admits_no_allocating_constructor(call, kind):
    payload = {"bytearray": _Alloc(bytearray, _BIG),
               "ndarray": _Alloc(np.ndarray, (_BIG,), np.dtype(np.uint8)),
               "reconstruct": _Alloc(_np_reconstruct_fn(), np.ndarray, (_BIG,), b"b")}[call]
    obj = (0, [{"params": payload, "prob": ([1.0], [0])}])
    if kind == "jb":
        raw = pickle.dumps(obj, protocol=4)
        assert len(raw) < 300
        data, load = zlib.compress(raw), mldr.load_jb
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:  # torch's zip layout; protocol 2 goes through torch.load
            z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=4 if kind == "pth4" else 2))
            z.writestr("archive/version", "3\n")
        data, load = buf.getvalue(), mldr.load_pth
    with pytest.raises((pickle.UnpicklingError, ValueError), match="refus|placeholder|allocat"):
        load(data, "evil")


def test_numpy_arrays_and_bytearrays_still_load():
    # what numpy and ml-dr really write: arrays (empty placeholder + state), bytearrays of bytes
    obj = (2, [{"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": bytearray(b"xyz"),
                "f": np.asfortranarray(np.eye(2, dtype=np.float32))}])
    no_ba = (2, [{k: v for k, v in obj[1][0].items() if k != "b"}])
    for proto in (2, 4):
        # torch.load's path (protocol 2) refuses bytearray altogether (torch admits
        # bytearray(n) by default); ml-dr never stores one
        for got in (mldr.load_pth(L.torch_bytes(obj if proto == 4 else no_ba, proto)),
                    mldr.load_jb(zlib.compress(pickle.dumps(obj, protocol=proto)))):
            np.testing.assert_array_equal(got[1][0]["a"], obj[1][0]["a"])
            np.testing.assert_array_equal(got[1][0]["f"], obj[1][0]["f"])
            assert got[1][0].get("b", bytearray(b"xyz")) == bytearray(b"xyz")
    # an array's state with more elements than bytes present is refused by numpy itself
    state_lie = pickle.dumps(np.zeros(4, np.uint8), protocol=4).replace(b"\x04\x85", b"\x40\x85")
    with pytest.raises(ValueError):
        mldr.load_jb(zlib.compress(state_lie), "lie.jb")


_LAUGHS = r"""
import os, resource, sys, time
# an address-space cap turns a runaway expansion into a MemoryError instead of swapping; not
# under the sanitizer job, whose preloaded ASan runtime reserves terabytes of shadow memory
if "libasan" not in os.environ.get("LD_PRELOAD", ""):
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
sys.path.insert(0, {root!r})
from fastload.bench import mldr_layout as L
from fastload.importers import mldr
cfg = L.make_config("rrc", 1, 1, 2, size=32)
x = [0]
for _ in range(40):
    x = [x, x]  # pickled once each (the memo), 2**40 values when expanded
cfg["notes"] = x
data = L.torch_bytes(cfg, 2)
assert len(data) < 4096, len(data)
imgs = {tmp!r} + "/imgs"
hw = L.write_image_folder(imgs, 2, classes=2)
with open({tmp!r} + "/config.pth.tar", "wb") as f:
    f.write(data)
L.write_archive({tmp!r} + "/a.tar", hw, L.make_config("rrc", 1, 1, 2, size=32))
t = time.perf_counter()
try:
    mldr.import_mldr({tmp!r} + "/a.tar", imgs, {tmp!r} + "/out", config={tmp!r} + "/config.pth.tar", progress=False)
except ValueError as e:
    print("ERR", round(time.perf_counter() - t, 2), e)
else:
    print("IMPORTED")
"""


def test_billion_laughs_config_fails_fast(tmp_path):
    import subprocess
    import sys

    # the checkout (the folder holding fastload/): fastload/ itself on sys.path would let
    # fastload/select shadow the standard library's select module
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(mldr.__file__))))
    r = subprocess.run([sys.executable, "-c", _LAUGHS.format(root=root, tmp=str(tmp_path))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ERR"), r.stdout
    secs, msg = r.stdout.split(" ", 2)[1:]
    assert float(secs) < 5.0
    assert "config.pth.tar" in msg and "too large" in msg


_SECRET = b"Zq9#top-secret-token-0123456789"


@pytest.mark.parametrize("name", ["0.jb", "0.pth.tar"])
def test_symlinked_member_error_shows_no_file_content(tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(_SECRET)
    arch = tmp_path / "a" / "reinforced_data"
    arch.mkdir(parents=True)
    (arch / "config.pth.tar").write_bytes(L.torch_bytes(L.make_config("rrc", 1, 1, 2, size=SIZE), None))
    os.symlink(secret, arch / name)
    with pytest.raises((ValueError, pickle.UnpicklingError)) as ei:
        list(mldr.iter_archive(str(tmp_path / "a")))
    msg = str(ei.value)
    assert name in msg
    shown = msg.replace(str(tmp_path), "")
    for k in range(1, 5):
        assert _SECRET[:k].decode() not in shown, msg
    assert f" {_SECRET[0]}" not in shown, msg  # nor its first byte as a number ("operand 90")


def test_gzip_crc_is_checked(tmp_path):
    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rrc", "tar.gz", n=3, classes=3, topk=2)
    data = bytearray(open(arch, "rb").read())
    assert mldr.import_mldr(arch, imgs, str(tmp_path / "ok"), progress=False)["num_rows"] == 3
    bad = tmp_path / "crc.tar.gz"
    data[-8] ^= 0x01  # the gzip trailer's CRC-32 (the deflate data is intact)
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc.tar.gz.*(CRC|corrupt)"):
        mldr.import_mldr(str(bad), imgs, str(tmp_path / "o1"), progress=False)
    data[-8] ^= 0x01
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bytes(data[:-8]))  # no trailer at all
    with pytest.raises(ValueError, match="cut.tar.gz.*(trailer|truncated)"):
        mldr.import_mldr(str(cut), imgs, str(tmp_path / "o2"), progress=False)


def test_joblib_named_pth_tar_is_read_by_content(tmp_path):
    # ml-dr's `joblib: true` writes joblib files with the .pth.tar name
    imgs, hw, cfg, arch, written = _setup(tmp_path, "mix_rare", "dir", n=5, jb=True)
    ref = mldr.import_mldr(arch, imgs, str(tmp_path / "ref"), progress=False)
    rd = os.path.join(arch, "reinforced_data")
    for f in os.listdir(rd):
        if f.endswith(".jb"):
            os.rename(os.path.join(rd, f), os.path.join(rd, f[:-3] + ".pth.tar"))
    assert not any(f.endswith(".jb") for f in os.listdir(rd))
    m = mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=False)
    assert m["num_rows"] == ref["num_rows"] == 5
    a, b = ReinforcedDataset(str(tmp_path / "out")), ReinforcedDataset(str(tmp_path / "ref"))
    for i in range(5):
        assert a.augs(i).tobytes() == b.augs(i).tobytes()
        assert a.augs_ext(i).tobytes() == b.augs_ext(i).tobytes()
    # and a legacy (non-zip) torch file is still a torch file
    buf = io.BytesIO()
    torch.save((1, [{"x": 2}]), buf, _use_new_zipfile_serialization=False)
    assert mldr._load("jb", buf.getvalue(), "legacy") == (1, [{"x": 2}])


def test_class_subset_is_accepted_with_the_mapping_stated(tmp_path, capsys):
    # 4 class folders, the config's teacher has 5 classes (e.g. ImageNet-100 with a 1k teacher)
    imgs, hw, cfg, arch, written = _setup(tmp_path, "rrc", "dir", n=4, classes=5, topk=3)
    assert len(mldr.image_folder(imgs)[2]) == 4
    m = mldr.import_mldr(arch, imgs, str(tmp_path / "out"), progress=True)
    assert m["num_classes"] == 5 and m["class_subset"]["folder_classes"] == 4
    assert m["class_subset"]["config_num_classes"] == 5
    assert "a subset" in capsys.readouterr().err
    ds = ReinforcedDataset(str(tmp_path / "out"))
    files, labels, classes = mldr.image_folder(imgs)
    assert list(ds.labels) == labels and max(labels) == 3


def _mldr_smooth_branch(vals) -> bool:
    """ml-dr's densify switch, computed as ml-dr does (test oracle): softmax where
    1.0 - torch.tensor(list of floats).sum() < 0."""
    return bool((1.0 - torch.tensor([float(v) for v in vals]).sum()) < 0.0)


def test_mldr_smooth_takes_mldrs_branch_on_every_record():
    from fastload.format.shards import decode_targets, encode_targets

    g = np.random.default_rng(0)
    n, k, C = 4000, 5, 1000
    logits = g.normal(0, 1, (n, C)).astype(np.float32)
    logits[np.arange(n), g.integers(0, C, n)] += g.uniform(8, 14, n).astype(np.float32)  # peaked teachers
    p = torch.softmax(torch.from_numpy(logits), 1).numpy()
    old_mismatch = new_mismatch = 0
    ids_all, stored = [], []
    for r in range(n):
        ids = np.argpartition(p[r], -k)[-k:]  # ml-dr's sparsify: archive order
        vals = p[r][ids]
        want = _mldr_smooth_branch(vals.tolist())
        order = np.argsort(-vals, kind="stable")
        plain = vals[order].astype(np.float16).astype(np.float32)
        old_mismatch += mldr._smooth_branch(plain) != want
        kept = mldr._smooth_branch_kept(vals, vals[order])
        assert np.abs(kept - vals[order]).max() < 2e-3  # within a few fp16 steps of the truth
        ids_all.append(ids[order])
        stored.append(kept)
    ids_all, stored = np.stack(ids_all), np.stack(stored)
    ids_d, probs_d = decode_targets(encode_targets(ids_all, stored))  # the stored blob, as the loader reads it
    got = densify(torch.from_numpy(ids_d.astype(np.int64)), torch.from_numpy(probs_d), C, mode="mldr_smooth")
    for r in range(n):
        vals = p[r][np.argpartition(p[r], -k)[-k:]]
        want = _mldr_smooth_branch(vals.tolist())
        softmax_used = bool(got[r][~np.isin(np.arange(C), ids_d[r])].abs().max() == 0)
        new_mismatch += softmax_used != want
    assert old_mismatch > 0  # fp16 alone crosses ml-dr's switch on some records (the bug)
    assert new_mismatch == 0


def test_semantics_generation_or_training(tmp_path, capsys):
    from fastload.cli import main

    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rare", "tar", n=3, classes=3)
    m = mldr.import_mldr(arch, imgs, str(tmp_path / "gen"), progress=False)
    assert m["policy"]["randaugment_semantics"] == "v1"  # generation: tensor ops, what the teacher scored
    # reinforce.py crops the PIL image before its tensor steps: Pillow's resize
    assert ReinforcedDataset(str(tmp_path / "gen")).policy.resize == "pil"
    assert main(["import-mldr", arch, "--images", imgs, "--out", str(tmp_path / "train"), "--quiet",
                 "--semantics", "training"]) == 0
    ds = ReinforcedDataset(str(tmp_path / "train"))
    assert ds.policy.randaugment_semantics == "pil"  # ml-dr's training-time dataset: PIL images
    assert ds.policy.resize == "pil"  # ... whose crop is F.resized_crop on PIL: Image.resize
    with pytest.raises(ValueError, match="semantics"):
        mldr.import_mldr(arch, imgs, str(tmp_path / "x"), progress=False, semantics="pil")


def _digests(manifest):
    return {s["index"]: s["sha256"] for s in manifest["shards"]}


@pytest.mark.slow
def test_ray_engine_writes_the_local_shards_and_resumes(tmp_path):
    """engine="ray": this process streams the archive and stages members; Ray tasks decode,
    convert and write each shard. Same shards byte for byte; a rerun redoes only what is missing."""
    ray = pytest.importorskip("ray")
    imgs, hw, cfg, arch, _ = _setup(tmp_path, "mix_rare", "tar.gz", n=8)
    local = mldr.import_mldr(arch, imgs, str(tmp_path / "local"), shard_size=3, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = str(tmp_path / "ray")
        m = mldr.import_mldr(arch, imgs, out, shard_size=3, progress=False, engine="ray")
        assert m["complete"] and _digests(m) == _digests(local)
        assert not os.path.exists(os.path.join(out, ".mldr-staging"))
    finally:
        ray.shutdown()
    # resume: a shard whose file is gone (as after a crash) is the only one rewritten
    kept = {s["index"]: os.path.getmtime(os.path.join(out, s["file"])) for s in m["shards"] if s["index"] != 1}
    os.remove(os.path.join(out, next(s["file"] for s in m["shards"] if s["index"] == 1)))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        m2 = mldr.import_mldr(arch, imgs, out, shard_size=3, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert _digests(m2) == _digests(local)
    assert all(os.path.getmtime(os.path.join(out, s["file"])) == kept[s["index"]]
               for s in m2["shards"] if s["index"] != 1)


def test_engine_is_checked(tmp_path):
    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rrc", "dir", n=2, classes=2, topk=2)
    with pytest.raises(ValueError, match="engine must be 'local' or 'ray', got 'spark'"):
        mldr.import_mldr(arch, imgs, str(tmp_path / "o"), progress=False, engine="spark")


def test_jpeg_sources_stored_with_restart_markers(tmp_path):
    """By default the JPEG sources are stored with restart markers: the same pixels, the same
    rendered samples as the files stored byte for byte (restart_markers=False)."""
    from fastload.replay import native

    if not native.have_jpeg():
        pytest.skip("built without libjpeg")
    imgs = str(tmp_path / "imgs")
    # wide enough for several restart intervals per MCU row: crops can be decoded by slice
    hw = L.write_image_folder(imgs, 6, classes=3, sizes=((120, 200), (152, 136)))
    cfg = L.make_config("mix_rare", 3, 3, 3, size=SIZE)
    arch = str(tmp_path / "a.tar")
    L.write_archive(arch, hw, cfg, seed=0, fmt="tar")
    on = mldr.import_mldr(arch, imgs, str(tmp_path / "on"), shard_size=4, progress=False)
    off = mldr.import_mldr(arch, imgs, str(tmp_path / "off"), shard_size=4, progress=False, restart_markers=False)
    assert on["image_encoding"]["restart_markers"] is True and off["image_encoding"]["restart_markers"] is False
    on, off = ReinforcedDataset(str(tmp_path / "on"), verify=True), ReinforcedDataset(str(tmp_path / "off"))
    files, _, _ = mldr.image_folder(imgs)
    slices = native.slice_count()
    for i, f in enumerate(files):
        with open(os.path.join(imgs, f), "rb") as fh:
            src = fh.read()
        b_on, b_off = bytes(on.image_bytes(i)), bytes(off.image_bytes(i))
        assert b_off == src and b"\xff\xdd" not in src
        assert b"\xff\xdd" in b_on  # a DRI marker
        np.testing.assert_array_equal(_decode(io.BytesIO(b_on)), _decode(os.path.join(imgs, f)))
        x_on, y_on, t_on = on[i]
        x_off, y_off, t_off = off[i]
        assert torch.equal(x_on, x_off) and y_on == y_off
        torch.testing.assert_close(t_on, t_off, atol=0, rtol=0)
    assert native.slice_count() > slices  # the marked sources were decoded by slice


def test_cli_no_restart_markers(tmp_path):
    from fastload.cli import main

    imgs, hw, cfg, arch, _ = _setup(tmp_path, "rrc", "tar", n=2, classes=2, topk=2)
    out = str(tmp_path / "out")
    assert main(["import-mldr", arch, "--images", imgs, "--out", out, "--quiet", "--no-restart-markers"]) == 0
    ds = ReinforcedDataset(out)
    assert ds.manifest["image_encoding"]["restart_markers"] is False
    files, _, _ = mldr.image_folder(imgs)
    assert bytes(ds.image_bytes(0)) == open(os.path.join(imgs, files[0]), "rb").read()
