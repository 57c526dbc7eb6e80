"""The augmentation policy and the sampling of its parameters into stored records.

Sampling follows torchvision's algorithms (RandomResizedCrop.get_params, RandAugment,
RandomErasing.get_params, v2 MixUp/CutMix), vectorized over all (sample, augmentation) pairs
with a private ``numpy.random.Generator``: the same generator state gives the same records.
The records are laid out as ``fastload/sample/params.py`` documents.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Tuple

import numpy as np

from . import params as P
from . import schema as S

_INTERPOLATIONS = ("bilinear", "bicubic")
_TIMM_INTERPOLATIONS = ("random", "bilinear", "bicubic")
TIMM_FILL = (124, 116, 104)  # timm's create_transform: img_mean = round(255 * ImageNet mean)
_TIMM_DEFAULTS = {"timm_config": None, "timm_fill": list(TIMM_FILL), "timm_interpolation": "random"}


@dataclasses.dataclass(frozen=True)
class TimmRandAugment:
    """A parsed timm RandAugment config string (``rand-m9-mstd0.5-inc1``): timm's defaults for
    what the string leaves out (m 10, n 2, p 0.5, mstd 0, mmax none = clip at 10, inc 0)."""

    m: int = 10
    n: int = 2
    p: float = 0.5
    mstd: float = 0.0  # inf: uniform in [0, m] (timm: any mstd > 100)
    mmax: Optional[int] = None
    inc: bool = False

    @property
    def ops(self) -> Tuple[str, ...]:
        """timm's op names, in timm's order (its _RAND_INCREASING_TRANSFORMS with inc1)."""
        return S.TIMM_RAND_INCREASING_OPS if self.inc else S.TIMM_RAND_OPS

    @property
    def upper(self) -> float:
        """The level clip (timm: ``magnitude_max or 10``)."""
        return float(self.mmax) if self.mmax else 10.0


def parse_timm_config(config: str) -> TimmRandAugment:
    """Parse timm's RandAugment config syntax (``timm.data.rand_augment_transform``):
    ``rand`` then dash-separated sections in any order: ``m<int>`` magnitude, ``n<int>`` ops
    per image, ``p<float>`` probability of each op, ``mstd<float>`` Gaussian magnitude noise
    (> 100: uniform in [0, m]), ``mmax<int>`` level clip (default 10), ``inc<0|1>`` the
    increasing op set. Anything else (``t<name>`` weighted/3a op sets, the old ``w`` key, a
    section without a value) is refused with its name.

    >>> parse_timm_config("rand-m9-mstd0.5-inc1")
    TimmRandAugment(m=9, n=2, p=0.5, mstd=0.5, mmax=None, inc=True)
    """
    if not isinstance(config, str):
        raise ValueError(f"timm_config must be a string like 'rand-m9-mstd0.5-inc1', got {config!r}")
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"timm_config {config!r}: must start with 'rand' (timm's RandAugment), got {parts[0]!r}")
    kw: dict = {}
    for sec in parts[1:]:
        if sec.startswith("t"):
            raise ValueError(f"timm_config {config!r}: section {sec!r} (transform set {sec[1:]!r}) is not supported: "
                             "fastload replays timm's default and increasing op sets (inc0/inc1) only")
        mt = re.fullmatch(r"([a-z]+)(\d.*)", sec)
        if mt is None:
            raise ValueError(f"timm_config {config!r}: section {sec!r} not understood (expected m, n, p, mstd, mmax "
                             "or inc followed by a number)")
        key, val = mt.groups()
        if key in kw:
            raise ValueError(f"timm_config {config!r}: section {key!r} given twice")
        try:
            if key == "m":
                kw["m"] = int(val)
            elif key == "n":
                kw["n"] = int(val)
            elif key == "p":
                kw["p"] = float(val)
            elif key == "mstd":
                v = float(val)
                kw["mstd"] = math.inf if v > 100 else v
            elif key == "mmax":
                kw["mmax"] = int(val)
            elif key == "inc":
                kw["inc"] = bool(int(val))
            else:
                raise ValueError(f"timm_config {config!r}: section {sec!r}: key {key!r} not understood (known: m, n, "
                                 "p, mstd, mmax, inc; timm's old 'w' weights key is not supported)")
        except ValueError as e:
            if "timm_config" in str(e):
                raise
            raise ValueError(f"timm_config {config!r}: section {sec!r}: value {val!r} is not a number of the "
                             f"kind {key!r} takes") from None
    cfg = TimmRandAugment(**kw)
    if not 1 <= cfg.n <= P.MAX_RA:
        raise ValueError(f"timm_config {config!r}: n{cfg.n}: fastload records hold 1..{P.MAX_RA} ops per image")
    if cfg.m < 0 or not (0.0 <= cfg.p <= 1.0) or cfg.mstd < 0 or math.isnan(cfg.mstd):
        raise ValueError(f"timm_config {config!r}: m must be >= 0, p in [0, 1], mstd >= 0")
    if cfg.mmax is not None and not 0 <= cfg.mmax <= 100:
        raise ValueError(f"timm_config {config!r}: mmax{cfg.mmax} outside 0..100")
    return cfg


def _pair(v, name):
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers, got {v!r}") from None
    return a, b


@dataclasses.dataclass
class AugmentPolicy:
    """Which augmentations to sample, with torchvision's hyperparameters.

    - ``rrc``: RandomResizedCrop with ``rrc_scale`` / ``rrc_ratio`` (else the full image).
    - ``flip``: horizontal flip with p=0.5.
    - ``randaugment``: ``None`` or ``(num_ops, magnitude)`` over ``ra_num_bins`` bins.
    - ``randaugment_semantics``: whose op arithmetic replay reproduces byte for byte:
      ``"v1"`` (``torchvision.transforms.RandAugment``, the default, and what datasets
      written before this field were made with) or ``"v2"`` (``transforms.v2.RandAugment``:
      Color, Contrast, Sharpness, AutoContrast and Solarize round differently, by a few
      levels; see ``fastload.replay.reference_ra``) or ``"pil"`` (``transforms.RandAugment``
      on PIL images, as DataCompDR and ml-dr's training-time dataset ran it: Pillow's
      resampling, blends and tables, up to ~200 levels from the tensor ops on some records),
      or ``"timm"``: timm's RandAugment (``timm.data.rand_augment_transform``) from
      ``timm_config`` (timm's string, e.g. ``"rand-m9-mstd0.5-inc1"``; ``randaugment`` stays
      None): its op set, per-op probability and magnitude noise are drawn here and stored
      (levels as float32 in the extension records); ``timm_fill`` is the geometric ops' fill
      (timm's ``img_mean``; create_transform's ImageNet default) and ``timm_interpolation``
      their resampling ("random": BILINEAR or BICUBIC per op, timm's default; or fixed).
    - ``erase``: RandomErasing probability (box from ``erase_scale`` / ``erase_ratio``).
    - ``mixup`` / ``cutmix``: Beta alpha (0 = off), each applied with probability ``mix_p``.
    - ``interpolation``: "bilinear" or "bicubic" (antialiased, as torchvision).
    - ``resize``: the crop resize's arithmetic at replay: ``"torch"`` (the default, and what
      manifests without the field read as: ``F.interpolate(antialias=True)`` on float, as
      torchvision's tensor path) or ``"pil"`` (Pillow's ``Image.resize`` of the integer crop,
      byte for byte, as torchvision's ``RandomResizedCrop`` on PIL images: the training replays
      of ml-dr and DataCompDR; JPEGs are decoded at full scale, no DCT scaling) or ``"pil12"``
      (the same in Pillow <= 12's pass order: always horizontal first, where Pillow >= 13 runs
      the vertical pass first when the height shrinks by more than twice as much as the width).
    - ``size``: nominal output (h, w) on which erase and CutMix boxes are sampled; they are
      stored as fractions, so a replay at another size scales them.

    Example:
        >>> p = AugmentPolicy(randaugment=(2, 9), erase=0.25, mixup=1.0, cutmix=1.0)
        >>> AugmentPolicy.from_dict(p.to_dict()) == p
        True
    """

    rrc: bool = True
    rrc_scale: Tuple[float, float] = (0.08, 1.0)
    rrc_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment: Optional[Tuple[int, int]] = None
    ra_num_bins: int = 31
    erase: float = 0.0
    erase_scale: Tuple[float, float] = (0.02, 0.33)
    erase_ratio: Tuple[float, float] = (0.3, 3.3)
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_p: float = 0.5
    interpolation: str = "bilinear"
    size: Tuple[int, int] = (224, 224)
    randaugment_semantics: str = "v1"
    timm_config: Optional[str] = None
    timm_fill: Tuple[int, int, int] = TIMM_FILL
    timm_interpolation: str = "random"
    resize: str = "torch"

    def __post_init__(self):
        self.rrc = bool(self.rrc)
        self.flip = bool(self.flip)
        self.rrc_scale = _pair(self.rrc_scale, "rrc_scale")
        self.rrc_ratio = _pair(self.rrc_ratio, "rrc_ratio")
        self.erase_scale = _pair(self.erase_scale, "erase_scale")
        self.erase_ratio = _pair(self.erase_ratio, "erase_ratio")
        s0, s1 = self.rrc_scale
        if not (0 < s0 <= s1 <= 1):
            raise ValueError(f"rrc_scale must satisfy 0 < min <= max <= 1, got {self.rrc_scale}")
        r0, r1 = self.rrc_ratio
        if not (0 < r0 <= r1):
            raise ValueError(f"rrc_ratio must satisfy 0 < min <= max, got {self.rrc_ratio}")
        e0, e1 = self.erase_scale
        if not (0 < e0 <= e1 <= 1):
            raise ValueError(f"erase_scale must satisfy 0 < min <= max <= 1, got {self.erase_scale}")
        q0, q1 = self.erase_ratio
        if not (0 < q0 <= q1):
            raise ValueError(f"erase_ratio must satisfy 0 < min <= max, got {self.erase_ratio}")
        self.ra_num_bins = int(self.ra_num_bins)
        if self.ra_num_bins < 2:
            raise ValueError(f"ra_num_bins must be >= 2, got {self.ra_num_bins}")
        if self.randaugment is not None:
            try:
                n, m = (int(x) for x in self.randaugment)
            except (TypeError, ValueError):
                raise ValueError("randaugment must be None or (num_ops, magnitude), "
                                 f"got {self.randaugment!r}") from None
            if not 1 <= n <= P.MAX_RA:
                raise ValueError(f"randaugment num_ops must be in 1..{P.MAX_RA}, got {n}")
            if not 0 <= m < self.ra_num_bins:
                raise ValueError(f"randaugment magnitude must be in 0..{self.ra_num_bins - 1}, got {m}")
            self.randaugment = (n, m)
        for name in ("erase", "mix_p"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
            setattr(self, name, v)
        for name in ("mixup", "cutmix"):
            v = float(getattr(self, name))
            if not (v >= 0.0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a Beta alpha >= 0 (0 = off), got {v}")
            setattr(self, name, v)
        if self.randaugment_semantics not in S.RA_SEMANTICS:
            raise ValueError(f"randaugment_semantics must be 'v1', 'v2', 'pil' or 'timm', got "
                             f"{self.randaugment_semantics!r}")
        if self.randaugment_semantics == "timm":
            if self.timm_config is None:
                raise ValueError("randaugment_semantics='timm' needs timm_config (timm's string, e.g. "
                                 "'rand-m9-mstd0.5-inc1')")
            if self.randaugment is not None:
                raise ValueError("randaugment=(num_ops, magnitude) is torchvision's; with randaugment_semantics="
                                 "'timm' the ops and magnitude come from timm_config")
            parse_timm_config(self.timm_config)
        elif self.timm_config is not None:
            raise ValueError(f"timm_config is given but randaugment_semantics is {self.randaugment_semantics!r} "
                             "(set randaugment_semantics='timm')")
        try:
            fill = tuple(int(v) for v in self.timm_fill)
        except (TypeError, ValueError):
            fill = ()
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ValueError(f"timm_fill must be 3 values in 0..255, got {self.timm_fill!r}")
        self.timm_fill = fill
        if self.timm_interpolation not in _TIMM_INTERPOLATIONS:
            raise ValueError(f"timm_interpolation must be one of {_TIMM_INTERPOLATIONS}, got "
                             f"{self.timm_interpolation!r}")
        if self.resize not in S.RESIZE_MODES:
            raise ValueError(f"resize must be one of {tuple(S.RESIZE_MODES)}, got {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        try:
            h, w = (int(x) for x in self.size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be (h, w), got {self.size!r}") from None
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {self.size!r}")
        self.size = (h, w)

    @property
    def timm(self) -> Optional[TimmRandAugment]:
        """The parsed ``timm_config`` (None unless the semantics is timm)."""
        return parse_timm_config(self.timm_config) if self.randaugment_semantics == "timm" else None

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def to_dict(self) -> dict:
        """JSON-ready dict (for the manifest)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        if self.randaugment_semantics != "timm":  # manifests without timm stay readable by older fastload
            for k in ("timm_config", "timm_fill", "timm_interpolation"):
                if d[k] == _TIMM_DEFAULTS[k]:
                    del d[k]
        if d["resize"] == "torch":  # the default: such manifests stay readable by older fastload
            del d["resize"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentPolicy":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer or foreign policy)."""
        if not isinstance(d, dict):
            raise ValueError(f"AugmentPolicy.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AugmentPolicy: unknown keys {unknown} (known: {sorted(known)})")
        kw = dict(d)
        for k in ("rrc_scale", "rrc_ratio", "erase_scale", "erase_ratio", "size", "timm_fill"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        if kw.get("randaugment") is not None:
            kw["randaugment"] = tuple(kw["randaugment"])
        return cls(**kw)


def _rrc(rng, hw, scale, ratio):
    """torchvision RandomResizedCrop.get_params for M images (hw: [M,2]) -> top, left, h, w."""
    M = hw.shape[0]
    H = hw[:, 0].astype(np.float64)
    W = hw[:, 1].astype(np.float64)
    area = H * W
    lr = np.log(np.array(ratio, dtype=np.float64))
    target = area[:, None] * rng.uniform(scale[0], scale[1], size=(M, 10))
    ar = np.exp(rng.uniform(lr[0], lr[1], size=(M, 10)))
    # np.round is round-half-even like Python's round().
    w = np.round(np.sqrt(target * ar)).astype(np.int64)
    h = np.round(np.sqrt(target / ar)).astype(np.int64)
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    any_ok = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.arange(M)
    bh = h[rows, first]
    bw = w[rows, first]
    # Fallback: the central crop at the nearest allowed ratio.
    Hi = hw[:, 0].astype(np.int64)
    Wi = hw[:, 1].astype(np.int64)
    in_ratio = W / H
    fw = Wi.copy()
    fh = Hi.copy()
    lo = in_ratio < min(ratio)
    hi = in_ratio > max(ratio)
    fh[lo] = np.round(Wi[lo] / min(ratio)).astype(np.int64)
    fw[hi] = np.round(Hi[hi] * max(ratio)).astype(np.int64)
    bh = np.where(any_ok, bh, fh)
    bw = np.where(any_ok, bw, fw)
    top = np.where(any_ok, rng.integers(0, np.maximum(Hi - bh + 1, 1)), (Hi - fh) // 2)
    left = np.where(any_ok, rng.integers(0, np.maximum(Wi - bw + 1, 1)), (Wi - fw) // 2)
    return top, left, bh, bw


def _quantize_boxes(top, left, bh, bw, H, W):
    """Vectorized params.pixels_to_box."""
    H = H.astype(np.int64)
    W = W.astype(np.int64)
    Q = P.Q
    return np.stack([(top * Q + H // 2) // H, (left * Q + W // 2) // W,
                     (bh * Q + H // 2) // H, (bw * Q + W // 2) // W], axis=-1).astype(np.uint16)


def _crops(policy, rng, hw):
    M = hw.shape[0]
    if policy.rrc:
        top, left, bh, bw = _rrc(rng, hw, policy.rrc_scale, policy.rrc_ratio)
        return _quantize_boxes(top, left, bh, bw, hw[:, 0], hw[:, 1])
    out = np.empty((M, 4), np.uint16)
    out[:] = (0, 0, P.Q, P.Q)
    return out


def _erase_boxes(rng, M, oh, ow, scale, ratio):
    """torchvision RandomErasing.get_params on an oh x ow output; width 0 where it gave up."""
    area = oh * ow
    lr = np.log(np.array(ratio, dtype=np.float64))
    ea = area * rng.uniform(scale[0], scale[1], size=(M, 10))
    ar = np.exp(rng.uniform(lr[0], lr[1], size=(M, 10)))
    h = np.round(np.sqrt(ea * ar)).astype(np.int64)
    w = np.round(np.sqrt(ea / ar)).astype(np.int64)
    ok = (h < oh) & (w < ow)
    any_ok = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.arange(M)
    bh = h[rows, first]
    bw = w[rows, first]
    top = rng.integers(0, np.maximum(oh - bh + 1, 1))
    left = rng.integers(0, np.maximum(ow - bw + 1, 1))
    q = _quantize_boxes(top, left, bh, bw, np.full(M, oh), np.full(M, ow))
    # torchvision returns the image unchanged when no try fits; a zero-area box is also none.
    q[~any_ok | (bh == 0) | (bw == 0)] = 0
    return q


def _timm_draws(cfg: TimmRandAugment, rng, M: int, interpolation: str):
    """timm's RandAugment draws for M images: (ra_ops, ra_mags, ra_vals) [M, MAX_RA] as the
    records store them. Per image, timm picks n ops uniformly with replacement; each op runs
    with probability p (skipped slots: RA_NONE), its magnitude m + N(0, mstd) (uniform in [0, m]
    for mstd inf) clipped to [0, mmax or 10] (stored as float32: the replay's level), a
    negation with probability 1/2 where timm draws one and BILINEAR/BICUBIC for geometric ops."""
    n = cfg.n
    names = cfg.ops
    ids = np.array([S.RA_OP_ID["Timm" + k] for k in names], np.int64)
    negated = np.array(["Timm" + k in S.RA_SIGNED for k in names])
    geometric = np.array([k in S.TIMM_GEOMETRIC for k in names])
    pick = rng.integers(0, len(names), size=(M, n))
    run = rng.random((M, n)) <= cfg.p if cfg.p < 1.0 else np.ones((M, n), bool)
    if math.isinf(cfg.mstd):
        mag = rng.uniform(0.0, cfg.m, size=(M, n))
    elif cfg.mstd > 0:
        mag = rng.normal(cfg.m, cfg.mstd, size=(M, n))
    else:
        mag = np.full((M, n), float(cfg.m))
    level = np.clip(mag, 0.0, cfg.upper).astype(np.float32)
    neg = (rng.random((M, n)) > 0.5) & negated[pick]
    if interpolation == "random":
        cub = rng.random((M, n)) < 0.5
    else:
        cub = np.full((M, n), interpolation == "bicubic")
    cub &= geometric[pick]
    ops = np.full((M, P.MAX_RA), P.RA_NONE, np.uint8)
    mags = np.zeros((M, P.MAX_RA), np.int8)
    vals = np.zeros((M, P.MAX_RA), np.float32)
    ops[:, :n] = np.where(run, ids[pick], P.RA_NONE)
    mags[:, :n] = np.where(run, np.where(neg, -1, 1) * np.where(cub, 2, 1), 0)
    vals[:, :n] = np.where(run, level, 0.0)
    return ops, mags, vals


def sample_params(policy: AugmentPolicy, rng: np.random.Generator, indices, all_hw: np.ndarray,
                  n_aug: int) -> np.ndarray:
    """Sample ``n_aug`` augmentation records for each dataset index in ``indices`` (base
    records only: a timm policy's draws need the extension records of :func:`sample_records`).

    ``all_hw`` is the [N, 2] (height, width) of every source image of the dataset (the
    partner of MixUp/CutMix is drawn uniformly over the other N - 1 images and gets its own
    crop and flip). Returns an array of shape ``(len(indices), n_aug)`` and dtype
    ``fastload.sample.params.AUG_DTYPE``.

    Example:
        >>> import numpy as np
        >>> hw = np.array([[375, 500], [500, 333]])
        >>> rec = sample_params(AugmentPolicy(), np.random.default_rng(0), [0, 1], hw, 4)
        >>> rec.shape
        (2, 4)
    """
    if isinstance(policy, AugmentPolicy) and policy.randaugment_semantics == "timm":
        raise ValueError("a timm RandAugment policy stores its levels in extension records: use sample_records")
    return sample_records(policy, rng, indices, all_hw, n_aug)[0]


def sample_records(policy: AugmentPolicy, rng: np.random.Generator, indices, all_hw: np.ndarray,
                   n_aug: int):
    """:func:`sample_params` with the extension records: ``(records, ext)``, ``ext`` of shape
    ``(len(indices), n_aug)`` and dtype ``params.AUG_EXT_DTYPE`` where the policy needs it
    (``randaugment_semantics="timm"``: the levels), else None.

    Example:
        >>> import numpy as np
        >>> hw = np.array([[375, 500], [500, 333]])
        >>> pol = AugmentPolicy(randaugment_semantics="timm", timm_config="rand-m9-mstd0.5-inc1")
        >>> rec, ext = sample_records(pol, np.random.default_rng(0), [0, 1], hw, 4)
        >>> rec.shape, ext.shape
        ((2, 4), (2, 4))
    """
    if not isinstance(policy, AugmentPolicy):
        raise ValueError(f"policy must be an AugmentPolicy, got {type(policy).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (a private, seeded generator)")
    all_hw = np.asarray(all_hw)
    if all_hw.ndim != 2 or all_hw.shape[1] != 2 or all_hw.shape[0] == 0:
        raise ValueError(f"all_hw must be an [N, 2] array of (height, width), got shape {all_hw.shape}")
    if (all_hw <= 0).any():
        raise ValueError("all_hw holds a non-positive height or width")
    N = all_hw.shape[0]
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= N):
        raise ValueError(f"indices out of range [0, {N})")
    n_aug = int(n_aug)
    if n_aug <= 0:
        raise ValueError(f"n_aug must be positive, got {n_aug}")
    B = idx.size
    M = B * n_aug
    out = P.empty((B, n_aug)).reshape(-1)
    timm = policy.timm
    ext = P.empty_ext(M) if timm is not None else None
    if M == 0:
        return out.reshape(B, n_aug), None if ext is None else ext.reshape(B, n_aug)
    owner = np.repeat(idx, n_aug)
    hw = all_hw[owner].astype(np.int64)

    out["crop"] = _crops(policy, rng, hw)
    flags = np.zeros(M, np.uint8)
    if policy.flip:
        flags |= (rng.random(M) < 0.5).astype(np.uint8) * P.FLAG_FLIP

    if timm is not None:
        out["ra_ops"], out["ra_mags"], ext["ra_vals"] = _timm_draws(timm, rng, M, policy.timm_interpolation)
        ext["ext"] = P.EXT_RA_FLOAT
    elif policy.randaugment is not None:
        n_ops, mag = policy.randaugment
        ops = rng.integers(0, len(S.family_ops("v1")), size=(M, n_ops))  # torchvision's op space
        neg = rng.integers(0, 2, size=(M, n_ops)).astype(bool)
        signed = np.array([name in P.RA_SIGNED for name in P.RA_OPS])[ops]
        mags = np.where(signed & neg, -mag, mag).astype(np.int8)
        ra_ops = np.full((M, P.MAX_RA), P.RA_NONE, np.uint8)
        ra_mags = np.zeros((M, P.MAX_RA), np.int8)
        ra_ops[:, :n_ops] = ops
        ra_mags[:, :n_ops] = mags
        out["ra_ops"] = ra_ops
        out["ra_mags"] = ra_mags

    oh, ow = policy.size
    if policy.erase > 0:
        apply = rng.random(M) < policy.erase
        boxes = _erase_boxes(rng, M, oh, ow, policy.erase_scale, policy.erase_ratio)
        boxes[~apply] = 0
        out["erase"] = boxes

    if policy.mixing:
        use_mix = (rng.random(M) < policy.mix_p) if policy.mixup > 0 else np.zeros(M, bool)
        use_cut = (rng.random(M) < policy.mix_p) if policy.cutmix > 0 else np.zeros(M, bool)
        lam_mix = rng.beta(policy.mixup, policy.mixup, size=M) if policy.mixup > 0 else np.ones(M)
        lam_cut = rng.beta(policy.cutmix, policy.cutmix, size=M) if policy.cutmix > 0 else np.ones(M)
        # v2 CutMix: centre uniform over output pixels, half-sides r * (W, H), clipped.
        cx = rng.integers(0, ow, size=M)
        cy = rng.integers(0, oh, size=M)
        r = 0.5 * np.sqrt(1.0 - lam_cut)
        rw = (r * ow).astype(np.int64)
        rh = (r * oh).astype(np.int64)
        x1 = np.clip(cx - rw, 0, None)
        y1 = np.clip(cy - rh, 0, None)
        x2 = np.clip(cx + rw, None, ow)
        y2 = np.clip(cy + rh, None, oh)
        cut_ok = use_cut & (x2 > x1) & (y2 > y1)
        cbox = _quantize_boxes(y1, x1, np.maximum(y2 - y1, 1), np.maximum(x2 - x1, 1),
                               np.full(M, oh), np.full(M, ow))
        cbox[~cut_ok] = 0
        need = use_mix | cut_ok
        if N > 1:
            partner = rng.integers(0, N - 1, size=M)
            partner += partner >= owner  # uniform over the other images
        else:
            partner = owner.copy()
        pcrop = _crops(policy, rng, all_hw[partner].astype(np.int64))
        pflip = (rng.random(M) < 0.5) if policy.flip else np.zeros(M, bool)
        flags |= np.where(need & pflip, P.FLAG_PARTNER_FLIP, 0).astype(np.uint8)
        flags |= np.where(use_mix, P.FLAG_MIXUP, 0).astype(np.uint8)
        flags |= np.where(cut_ok, P.FLAG_CUTMIX, 0).astype(np.uint8)
        out["partner"] = np.where(need, partner, -1)
        pcrop[~need] = 0
        out["pcrop"] = pcrop
        out["mixup"] = np.where(use_mix, np.rint(lam_mix * P.Q), 0).astype(np.uint16)
        out["cutmix"] = cbox
    out["flags"] = flags
    return out.reshape(B, n_aug), None if ext is None else ext.reshape(B, n_aug)
