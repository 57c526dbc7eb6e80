"""Program prologues shared by the replay's Triton kernels (replay.py, ra_pil.py, ra_timm.py):
the tile of an image a program covers, and a RandAugment slot's per-image op and pixels."""
import triton
import triton.language as tl


@triton.jit
def _tile(h, w, BLOCK: tl.constexpr, ALIGN: tl.constexpr = False):
    """Program (sample b, tile t) of an [h, w] image: its pixels' flat offsets, mask, y, x.
    ALIGN (the host checked h * w % 16 == 0): the planes of [B, 3, h, w] buffers start on
    16-element boundaries, so contiguous loads and stores can be vectorized."""
    b = tl.program_id(0)
    t = tl.program_id(1)
    npix = h * w
    if ALIGN:
        npix = tl.multiple_of(npix, 16)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    return b, npix, offs, offs < npix, offs // w, offs % w


@triton.jit
def _slot_pixels(rai_ptr, src_ptr, b, npix, offs, mask):
    """A RandAugment slot's op id and int parameter of image b (``rai`` [R, 2]), the image's
    base pointer in the [R, 3, h, w] uint8 source and its three planes at ``offs`` as float
    (contiguous: vectorized loads when ALIGN; geometric ops reload)."""
    op = tl.load(rai_ptr + 2 * b)
    ip = tl.load(rai_ptr + 2 * b + 1)
    base = src_ptr + b.to(tl.int64) * 3 * npix
    x0 = tl.load(base + offs, mask=mask, other=0).to(tl.float32)
    x1 = tl.load(base + npix + offs, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(base + 2 * npix + offs, mask=mask, other=0).to(tl.float32)
    return op, ip, base, x0, x1, x2


@triton.jit
def _stats_tile(src_ptr, rai_ptr, npix, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """A statistics program (image b, pixel tile t) of a RandAugment slot: b, the image's op
    id, npix (with ALIGN's alignment hint), its base pointer in the [R, 3, h, w] uint8 source,
    the tile's offsets and mask."""
    b = tl.program_id(0)
    t = tl.program_id(1)
    op = tl.load(rai_ptr + 2 * b)
    if ALIGN:
        npix = tl.multiple_of(npix, 16)
    base = src_ptr + b.to(tl.int64) * 3 * npix
    offs = t * BLOCK + tl.arange(0, BLOCK)
    return b, op, npix, base, offs, offs < npix
