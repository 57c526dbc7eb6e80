// JPEG decoding with libjpeg(-turbo) fused with the resize: DCT-domain downscaling (rule
// "pow2": 1/2, 1/4, 1/8; rule "m8": M/8) when the scaled crop still covers the output. Measured
// on ~500x375 q90 photos (fastload/bench/kernel.py): "m8" is ~10% slower per image than
// "pow2" (only the 8x8, 4x4, 2x2 and 1x1 IDCTs are SIMD in libjpeg-turbo; the others and the
// 2M-point chroma IDCTs are C) and less accurate, so "pow2" stays the default. Region decoding (jpeg_crop_scanline for
// the columns, jpeg_skip_scanlines for the rows above the crop, stop after the last needed
// row), and the horizontal resize pass run on each scanline as it is decoded.
//
// libjpeg reports errors through error_exit, which by default calls exit(): here it
// longjmps back to the caller, and warnings (corrupt or truncated data) are errors too.
#include "fl_common.h"
#include "replay_impl.h"

#ifdef FASTLOAD_HAVE_JPEG
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

#include <jpeglib.h>

namespace fl {

// The work and memory one JPEG may cost (see jpeg_limits below). A header is cheap to forge:
// a few KB of arithmetic-coded or progressive data can declare 16384 x 16384 pixels, which
// the decoder then walks (seconds of work per image) or buffers (whole-image coefficient
// arrays: ~0.7 GB). Every decode checks, before any pixel work:
//   max_pixels        declared width x height (default 2^26, 8192 x 8192);
//   max_pixels_per_byte  above free_pixels (default 2^22), declared pixels per byte of
//                     compressed data (default 4096): real images carry far more data (a
//                     flat colour in baseline Huffman coding already needs a byte per ~170
//                     pixels), so this rejects tiny files that declare huge images;
//   max_bytes         memory libjpeg may hold for the image's coefficient buffers (default
//                     384 MiB, enough for any image under max_pixels); a larger request
//                     fails inside libjpeg instead of allocating.
// An image over a limit is a bad JPEG (an error naming the sample), like a corrupt one.
namespace {
std::atomic<int64_t> g_max_pixels{int64_t(1) << 26};
std::atomic<int64_t> g_free_pixels{int64_t(1) << 22};
std::atomic<int64_t> g_max_pixels_per_byte{4096};
std::atomic<int64_t> g_max_bytes{int64_t(384) << 20};

// Bytes of `data` that can carry pixels: all but the APPn and COM segments (metadata and
// comments). A forged header padded with a comment must not buy itself a larger pixel budget:
// max_pixels_per_byte counts these bytes only. A walk over the marker segments, O(len); what
// it cannot parse counts as data (libjpeg then reports the damage itself).
size_t pixel_bytes(const uint8_t* d, size_t len) {
  size_t skipped = 0, i = 2;  // after SOI
  while (i + 4 <= len) {
    if (d[i] != 0xFF) break;
    uint8_t m = d[i + 1];
    if (m == 0xFF) { ++i; continue; }  // fill byte
    if (m == 0xD9) break;              // EOI
    if ((m >= 0xD0 && m <= 0xD8) || m == 0x01) { i += 2; continue; }  // no length
    const size_t seg = ((size_t)d[i + 2] << 8) | d[i + 3];
    if (seg < 2 || i + 2 + seg > len) break;
    if ((m >= 0xE0 && m <= 0xEF) || m == 0xFE) skipped += 2 + seg;
    i += 2 + seg;
    if (m == 0xDA) {  // entropy-coded data up to the next marker other than RSTn / stuffing
      while (i + 1 < len && !(d[i] == 0xFF && d[i + 1] != 0x00 && !(d[i + 1] >= 0xD0 && d[i + 1] <= 0xD7)))
        ++i;
    }
  }
  return len - std::min(skipped, len);
}

// `data`/`len`: the whole file; its pixel-carrying bytes (pixel_bytes, an O(len) walk) are
// counted only for an image over free_pixels, the only case the per-byte limit looks at:
// the walk was ~4% of a render's CPU time on ~500x375 photos, which never need it.
int check_limits(uint64_t w, uint64_t h, const uint8_t* data, size_t len, jpeg_memory_mgr* mem) {
  const uint64_t px = w * h;
  const int64_t max_px = g_max_pixels.load(), free_px = g_free_pixels.load();
  const int64_t ppb = g_max_pixels_per_byte.load();
  if (px > (uint64_t)max_px)
    return fail("bad JPEG: %llux%llu (%llu pixels) exceeds the pixel limit of %lld "
                "(fastload.replay.native.set_decode_limits / FASTLOAD_MAX_DECODE_PIXELS)",
                (unsigned long long)w, (unsigned long long)h, (unsigned long long)px, (long long)max_px);
  if (px > (uint64_t)free_px && ppb > 0 && px / (uint64_t)ppb > (uint64_t)(len = pixel_bytes(data, len)))
    return fail("bad JPEG: %llux%llu declared in %zu bytes of data, comments and APPn segments excluded (more "
                "than %lld pixels per byte: a forged or truncated header; limit: set_decode_limits / "
                "FASTLOAD_MAX_PIXELS_PER_BYTE)",
                (unsigned long long)w, (unsigned long long)h, len, (long long)ppb);
  mem->max_memory_to_use = (long)g_max_bytes.load();
  return 0;
}
}  // namespace

void set_jpeg_limits(int64_t max_pixels, int64_t max_bytes, int64_t max_pixels_per_byte, int64_t free_pixels) {
  if (max_pixels > 0) g_max_pixels.store(max_pixels);
  if (max_bytes > 0) g_max_bytes.store(max_bytes);
  if (max_pixels_per_byte >= 0) g_max_pixels_per_byte.store(max_pixels_per_byte);
  if (free_pixels >= 0) g_free_pixels.store(free_pixels);
}

void get_jpeg_limits(int64_t* v) {
  v[0] = g_max_pixels.load();
  v[1] = g_max_bytes.load();
  v[2] = g_max_pixels_per_byte.load();
  v[3] = g_free_pixels.load();
}

namespace {

struct ErrMgr {
  jpeg_error_mgr pub;
  jmp_buf jump;
  char msg[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  ErrMgr* e = reinterpret_cast<ErrMgr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->msg);
  longjmp(e->jump, 1);
}

void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) on_error(cinfo);  // a warning: corrupt or truncated data
}

void on_output(j_common_ptr) {}

// A decompressor whose errors land in e.msg; callers setjmp(e.jump) before any libjpeg call.
struct Decoder {
  jpeg_decompress_struct cinfo;
  ErrMgr err;
  volatile bool created = false;  // set after setjmp: must survive a longjmp
  Decoder() {
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.pub.output_message = on_output;
    err.msg[0] = 0;
  }
  ~Decoder() {
    if (created) jpeg_destroy_decompress(&cinfo);
  }
};

// DCT scaling rules (the replay settings record which one a dataset was generated with):
//   kDctPow2 ("pow2", the first rule): 1/d for the largest d in {8, 4, 2} with the crop
//            >= d x the output on both axes, else no scaling;
//   kDctM8   ("m8"): M/8 for the smallest M in 1..8 with the scaled crop >= the output on
//            both axes (libjpeg-turbo >= 1.3 scales by M/8 with M = 1..16).
// Returns M (scale M/8); 8 = no scaling.
int choose_scale_num(int rule, int bh, int bw, int oh, int ow) {
  if (rule == kDctPow2) {
    for (int d = 8; d >= 2; d /= 2)
      if ((int64_t)bh >= (int64_t)oh * d && (int64_t)bw >= (int64_t)ow * d) return 8 / d;
    return 8;
  }
  if (rule == kDctM8) {
    const int64_t my = (8 * (int64_t)oh + bh - 1) / bh, mx = (8 * (int64_t)ow + bw - 1) / bw;
    const int64_t m = std::max<int64_t>(1, std::max(my, mx));
    return m >= 8 ? 8 : (int)m;
  }
  return 8;
}

// Everything between setjmp and a possible longjmp lives in `d` or is POD: no destructor is
// skipped by the jump.
int begin(Decoder& d, const uint8_t* data, size_t len) {
  jpeg_create_decompress(&d.cinfo);
  d.created = true;
  jpeg_mem_src(&d.cinfo, data, (unsigned long)len);
  jpeg_read_header(&d.cinfo, TRUE);
  // CMYK/YCCK (Adobe) images: libjpeg-turbo converts them to CMYK only; cmyk_to_rgb below.
  const bool four = d.cinfo.jpeg_color_space == JCS_CMYK || d.cinfo.jpeg_color_space == JCS_YCCK;
  d.cinfo.out_color_space = four ? JCS_CMYK : JCS_RGB;
  return check_limits(d.cinfo.image_width, d.cinfo.image_height, data, len, d.cinfo.mem);
}

// Adobe CMYK (stored inverted, as Photoshop writes it) -> RGB, Pillow's rule (JpegImagePlugin
// reads 4-component JPEGs as "CMYK;I", then cmyk2rgb): with c, k the un-inverted inks,
// R = CLIP(255 - k - (c (255 - k)) / 255), i.e. from the stored bytes C', K':
// R = K' - muldiv255(255 - C', K'), muldiv255 rounding as Pillow's MULDIV255.
inline uint8_t muldiv255(int a, int b) {
  const int t = a * b + 128;
  return (uint8_t)((t + (t >> 8)) >> 8);
}

void cmyk_to_rgb(const uint8_t* in, uint8_t* out, int n) {
  for (int x = 0; x < n; ++x, in += 4, out += 3) {
    const int nk = in[3];
    for (int c = 0; c < 3; ++c) {
      const int v = nk - muldiv255(255 - in[c], nk);
      out[c] = (uint8_t)(v < 0 ? 0 : v);
    }
  }
}

// Checks the output is RGB or CMYK (converted per row); returns the bytes per output pixel.
int out_bytes_per_pixel(const jpeg_decompress_struct& ci) {
  if (ci.out_color_space == JCS_CMYK && ci.output_components == 4) return 4;
  if (ci.output_components == 3) return 3;
  return -1;
}

}  // namespace

int jpeg_dims(const uint8_t* data, size_t len, int* h, int* w) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  if (data == nullptr || len < 4) return fail("bad JPEG: empty or too short (%zu bytes)", len);
  if (begin(d, data, len)) return -1;
  *h = (int)d.cinfo.image_height;
  *w = (int)d.cinfo.image_width;
  return 0;
}

int jpeg_scaled_dims(const uint8_t* data, size_t len, int denom, int* oh, int* ow) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  if (data == nullptr || len < 4) return fail("bad JPEG: empty or too short (%zu bytes)", len);
  if (begin(d, data, len)) return -1;
  d.cinfo.scale_num = 1;
  d.cinfo.scale_denom = (unsigned)denom;
  jpeg_calc_output_dimensions(&d.cinfo);
  *oh = (int)d.cinfo.output_height;
  *ow = (int)d.cinfo.output_width;
  return 0;
}

// Restart-marker slicing. A baseline JPEG whose restart interval divides its MCU row (what
// jpeg_add_restarts writes) can be decoded from any MCU row on: the DC predictors reset at
// every RSTn, so the entropy-coded bytes from the marker that opens row m0 are a complete scan
// of rows m0.. . jpeg_skip_scanlines cannot do this (it entropy-decodes every skipped row, ~20%
// of a render on RandomResizedCrop crops), so start_crop_decode hands libjpeg a shorter JPEG:
// the original header with the height cut, the scan from row m0's marker up to the MCU row
// below the rows the caller needs, the RSTn renumbered from 0 (libjpeg checks the sequence),
// then EOI. The rows just above and below those needed are kept: fancy upsampling reads the
// chroma row on either side, so the rows needed decode exactly as in the whole image (tested
// against whole-image decodes, tests/test_jpeg_restart.py). Anything else (progressive,
// arithmetic, several scans, no usable interval, an image over the free pixel budget)
// decodes the whole way, as before.
struct SliceHeader {
  size_t sof_y = 0, sos_end = 0;  // offset of the SOF's height field; first entropy-coded byte
  int H = 0, W = 0, mcu_h = 0, mcu_w = 0, mcu_rows = 0;
  int ri = 0, ipr = 0;  // restart interval (MCUs), intervals per MCU row
};

static bool slice_header(const uint8_t* d, size_t len, SliceHeader* h) {
  size_t i = 2;
  int nf = 0, hmax = 1, vmax = 1, ri = 0;
  if (len < 4 || d[0] != 0xFF || d[1] != 0xD8) return false;
  while (i + 4 <= len) {
    if (d[i] != 0xFF) return false;
    const uint8_t m = d[i + 1];
    if (m == 0xFF) { ++i; continue; }
    if (m == 0xD8 || m == 0xD9 || (m >= 0xD0 && m <= 0xD7) || m == 0x01) return false;
    const size_t seg = ((size_t)d[i + 2] << 8) | d[i + 3];
    if (seg < 2 || i + 2 + seg > len) return false;
    const uint8_t* p = d + i + 4;
    if (m == 0xC0 || m == 0xC1) {  // baseline / extended sequential, Huffman
      if (nf || seg < 8) return false;
      h->sof_y = i + 5;
      h->H = (p[1] << 8) | p[2];
      h->W = (p[3] << 8) | p[4];
      nf = p[5];
      if (nf < 1 || nf > 4 || seg < 8 + 3 * (size_t)nf || h->H < 1 || h->W < 1) return false;
      for (int c = 0; c < nf; ++c) {
        const int hs = p[7 + 3 * c] >> 4, vs = p[7 + 3 * c] & 15;
        if (hs < 1 || hs > 4 || vs < 1 || vs > 4) return false;
        hmax = std::max(hmax, hs);
        vmax = std::max(vmax, vs);
      }
    } else if ((m >= 0xC2 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC) {
      return false;  // progressive, lossless, arithmetic, hierarchical
    } else if (m == 0xDD) {
      if (seg != 4) return false;
      ri = (p[0] << 8) | p[1];
    } else if (m == 0xDC) {
      return false;  // DNL: the height comes after the scan
    } else if (m == 0xDA) {
      if (!nf || seg < 3 || p[0] != nf) return false;  // one interleaved scan only
      h->sos_end = i + 2 + seg;
      if (nf == 1) hmax = vmax = 1;  // a single component's MCU is one block
      h->mcu_w = 8 * hmax;
      const int per_row = (h->W + h->mcu_w - 1) / h->mcu_w;
      h->mcu_h = 8 * vmax;
      h->mcu_rows = (h->H + h->mcu_h - 1) / h->mcu_h;
      if (ri <= 0 || per_row % ri) return false;
      h->ri = ri;
      h->ipr = per_row / ri;
      return true;
    }
    i += 2 + seg;
  }
  return false;
}

// Builds the JPEG of MCU rows [m0, m1) and restart intervals [c0, c1) of each row of `d`
// into s.sub; false (nothing usable) if the scan does not have its markers where the header
// says (the whole decode then reports the damage). The width is cut to the intervals kept
// (their MCUs, or to the image's edge for the row's last interval): a restart interval
// divides the row, so the slice's rows are whole intervals and keep the file's DRI.
static bool build_slice(const uint8_t* d, size_t len, const SliceHeader& h, int m0, int m1, int c0, int c1,
                        Scratch& s) {
  const int64_t first = (int64_t)m0 * h.ipr, last = (int64_t)m1 * h.ipr;
  // Walk the scan's markers: RSTn number k (or EOI, after the image's last interval) ends
  // interval k. iv: (start, end) of each interval of rows [m0, m1).
  std::vector<size_t>& iv = s.sub_iv;
  iv.clear();
  size_t i = h.sos_end, start = h.sos_end;
  for (int64_t k = 0; k < last;) {
    const uint8_t* f = (const uint8_t*)std::memchr(d + i, 0xFF, len - i);
    if (!f || (size_t)(f - d) + 1 >= len) return false;
    i = (size_t)(f - d);
    const uint8_t m = d[i + 1];
    if (m == 0x00 || m == 0xFF) { i += m == 0x00 ? 2 : 1; continue; }  // stuffed byte; fill
    const bool eoi = m == 0xD9 && k + 1 == (int64_t)h.mcu_rows * h.ipr;
    if (!eoi && (m < 0xD0 || m > 0xD7 || (m & 7) != (k & 7))) return false;  // a marker out of place
    if (k >= first) {
      iv.push_back(start);
      iv.push_back(i);
    }
    start = i + 2;
    i += 2;
    ++k;
  }
  std::vector<uint8_t>& o = s.sub;
  o.clear();
  o.insert(o.end(), d, d + h.sos_end);
  const int rows = std::min(h.H - m0 * h.mcu_h, (m1 - m0) * h.mcu_h);
  const int iw = h.mcu_w * h.ri;  // source pixels per interval
  const int cols = c1 == h.ipr ? h.W - c0 * iw : (c1 - c0) * iw;
  o[h.sof_y] = (uint8_t)(rows >> 8);
  o[h.sof_y + 1] = (uint8_t)(rows & 0xFF);
  o[h.sof_y + 2] = (uint8_t)(cols >> 8);
  o[h.sof_y + 3] = (uint8_t)(cols & 0xFF);
  int64_t n = 0;
  const int64_t total = (int64_t)(m1 - m0) * (c1 - c0);
  for (int r = m0; r < m1; ++r) {
    for (int c = c0; c < c1; ++c) {
      const size_t j = (size_t)(r - m0) * h.ipr + c;  // the interval's index in the slice walk
      const size_t b0 = iv[2 * j], b1 = iv[2 * j + 1];
      o.insert(o.end(), d + b0, d + b1);
      if (++n < total) {
        o.push_back(0xFF);
        o.push_back((uint8_t)(0xD0 + ((n - 1) & 7)));
      }
    }
  }
  o.push_back(0xFF);
  o.push_back(0xD9);
  return true;
}

std::atomic<int64_t> g_slices{0};

// The start shared by jpeg_render and jpeg_crop_floor: header, the crop in source pixels, the
// DCT scale M/8 the loader's rule picks for it, decompression started. Runs after the caller's
// setjmp (a libjpeg error longjmps back into the caller's frame, which is still live).
struct CropDecode {
  int t, l, bh, bw, M, SH, SW, bpp;
  // restart-marker slicing: the slice's first scaled row and column in the whole image, and
  // its scaled width (yo = xo = 0, SWs = SW without)
  int yo = 0, xo = 0, SWs = 0;
};

// jpeg_crop_scanline on columns [left, right) of the whole image (scaled), for a slice too;
// *xoff, *cw: the columns libjpeg chose (widened to iMCU edges), in whole-image columns.
static void crop_columns(jpeg_decompress_struct& ci, const CropDecode& g, int left, int right, JDIMENSION* xoff,
                         JDIMENSION* cw) {
  *xoff = (JDIMENSION)(left - g.xo);
  *cw = (JDIMENSION)(right - left);
  if (*xoff != 0 || (int)*cw != g.SWs) jpeg_crop_scanline(&ci, xoff, cw);
  *xoff += (JDIMENSION)g.xo;
}

// Skips to scaled row y of the whole image (a slice starts at row g.yo).
static int skip_to(jpeg_decompress_struct& ci, const CropDecode& g, int y) {
  const int k = y - g.yo;
  if (k < 0) return fail("bad JPEG: row %d is above the decoded slice", y);
  if (k > 0 && (int)jpeg_skip_scanlines(&ci, (JDIMENSION)k) != k) return fail("bad JPEG: could not skip to row %d", y);
  return 0;
}

static int start_crop_decode(Decoder& d, const uint8_t* data, size_t len, const uint16_t crop[4], int oh, int ow,
                             int dct, bool speed_flags, Scratch& s, CropDecode* g) {
  if (data == nullptr || len < 4) return fail("bad JPEG: empty or too short (%zu bytes)", len);
  SliceHeader sh;
  g->yo = g->xo = 0;
  if (slice_header(data, len, &sh) &&
      (int64_t)sh.H * sh.W <= std::min(g_free_pixels.load(), g_max_pixels.load())) {
    box_to_pixels(crop, sh.H, sh.W, &g->t, &g->l, &g->bh, &g->bw);
    g->M = choose_scale_num(dct & 0xff, g->bh, g->bw, oh, ow);
    // Every caller's rows lie in [ylo, yhi), the crop in scaled pixels. Fancy upsampling
    // reads one chroma row above and below a row: the rows ylo - 1 and yhi must decode as in
    // the whole image, so the slice holds the MCU rows of both (mh scaled rows each).
    // Columns: every caller decodes [xlo - 2, xhi + 2) at most (a 2-column margin for
    // jpeg_crop_scanline's edges), and the slice's own edge columns are upsampled without
    // their outer neighbour: intervals covering 2 more columns on each side keep them exact.
    const int mh = sh.mcu_h * g->M / 8, iw = sh.ri * sh.mcu_w * g->M / 8;
    const int ylo = (int)((int64_t)g->t * g->M / 8), yhi = (int)(((int64_t)(g->t + g->bh) * g->M + 7) / 8);
    const int xlo = (int)((int64_t)g->l * g->M / 8), xhi = (int)(((int64_t)(g->l + g->bw) * g->M + 7) / 8);
    const int m0 = std::max(0, (ylo - 1) / mh), m1 = std::min(sh.mcu_rows, yhi / mh + 1);
    const int c0 = std::max(0, (xlo - 4) / iw), c1 = std::min(sh.ipr, (xhi + 4 + iw - 1) / iw);
    if ((m0 > 0 || c0 > 0 || c1 < sh.ipr) && m1 > m0 && c1 > c0 && build_slice(data, len, sh, m0, m1, c0, c1, s)) {
      data = s.sub.data();
      len = s.sub.size();
      g->yo = m0 * mh;
      g->xo = c0 * iw;
      g_slices.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (begin(d, data, len)) return -1;
  jpeg_decompress_struct& ci = d.cinfo;
  const bool sliced = !s.sub.empty() && data == s.sub.data();
  if (!sliced) {
    box_to_pixels(crop, (int)ci.image_height, (int)ci.image_width, &g->t, &g->l, &g->bh, &g->bw);
    g->M = choose_scale_num(dct & 0xff, g->bh, g->bw, oh, ow);
  }
  ci.scale_num = (unsigned)g->M;
  ci.scale_denom = 8;
  if (speed_flags && (dct & kDctIfast)) ci.dct_method = JDCT_IFAST;
  if (speed_flags && (dct & kDctNoFancy)) ci.do_fancy_upsampling = FALSE;
  jpeg_start_decompress(&ci);
  // the whole image's scaled height (libjpeg's jdiv_round_up), whatever slice is decoded
  g->SH = sliced ? (int)(((int64_t)sh.H * g->M + 7) / 8) : (int)ci.output_height;
  g->SW = sliced ? (int)(((int64_t)sh.W * g->M + 7) / 8) : (int)ci.output_width;
  g->SWs = (int)ci.output_width;
  g->bpp = out_bytes_per_pixel(ci);
  if (g->bpp < 0) return fail("bad JPEG: %d output components", ci.output_components);
  return 0;
}

int jpeg_render(const uint8_t* data, size_t len, const uint16_t crop[4], bool flip, int oh, int ow,
                bool bicubic, int dct, Scratch& s, uint8_t* out) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  CropDecode g;
  if (start_crop_decode(d, data, len, crop, oh, ow, dct, true, s, &g)) return -1;
  jpeg_decompress_struct& ci = d.cinfo;
  const int t = g.t, l = g.l, bh = g.bh, bw = g.bw, M = g.M, SH = g.SH, SW = g.SW, bpp = g.bpp;
  // The crop in scaled pixels: each 8x8 block decodes to M x M pixels, so scaled pixel k
  // covers source pixels [8k/M, 8(k+1)/M).
  const double inv = M / 8.0;
  const double fx0 = l * inv, fy0 = t * inv, fw = bw * inv, fh = bh * inv;
  const int xlo = (int)((int64_t)l * M / 8), xhi = std::min(SW, (int)(((int64_t)(l + bw) * M + 7) / 8));
  const int ylo = (int)((int64_t)t * M / 8), yhi = std::min(SH, (int)(((int64_t)(t + bh) * M + 7) / 8));
  compute_axis_weights(ow, fx0, fw, xlo, xhi, bicubic, s.ax, true);
  compute_axis_weights(oh, fy0, fh, ylo, yhi, bicubic, s.ay, false);
  // jpeg_crop_scanline widens the region to iMCU edges; the first and last columns of a
  // cropped region are upsampled without their outer neighbour's chroma (they differ from a
  // full decode), so decode 2 more columns on each side than the taps need.
  const int left = std::max(0, s.ax.tap_lo - 2), right = std::min(SW, s.ax.tap_hi + 2);
  JDIMENSION xoff, cw;
  crop_columns(ci, g, left, right, &xoff, &cw);
  const int row_bytes = (int)cw * 3;
  VStream vs;
  vs.begin(&s.ay, ow * 3, s.tmp, out);
  vs.direct = s.direct;
  int rlo = s.ay.tap_lo, rhi = s.ay.tap_hi;  // input rows to decode (scaled pixels)
  if (s.win_y1 > s.win_y0) vs.window(s.win_y0, s.win_y1, &rlo, &rhi);
  const int nrows = rhi - rlo;
  const int batch_rows = 4;
  // +16 bytes: the horizontal pass reads a few bytes past the last pixel.
  if (s.rows.size() < (size_t)batch_rows * row_bytes + 16) s.rows.resize((size_t)batch_rows * row_bytes + 16);
  if (skip_to(ci, g, rlo)) return -1;
  JSAMPROW ptrs[batch_rows];
  const size_t in_row = (size_t)cw * bpp;  // what libjpeg writes per row (CMYK: 4 bytes/pixel)
  if (bpp == 4 && s.cmyk.size() < (size_t)batch_rows * in_row) s.cmyk.resize((size_t)batch_rows * in_row);
  for (int k = 0; k < batch_rows; ++k)
    ptrs[k] = bpp == 4 ? &s.cmyk[(size_t)k * in_row] : &s.rows[(size_t)k * row_bytes];
  int r = 0;
  while (r < nrows) {
    int want = std::min(batch_rows, nrows - r);
    int got = (int)jpeg_read_scanlines(&ci, ptrs, (JDIMENSION)want);
    if (got <= 0) return fail("bad JPEG: no data at row %d", rlo + r);
    for (int k = 0; k < got; ++k) {
      const int y = rlo + r + k;
      uint8_t* rgb = &s.rows[(size_t)k * row_bytes];
      if (bpp == 4) cmyk_to_rgb(ptrs[k], rgb, (int)cw);
      resize_row_h(rgb, (int)xoff, s.ax, flip, vs.slot(y), (int64_t)row_bytes + 16);
      vs.row_done(y);
    }
    r += got;
  }
  jpeg_abort_decompress(&ci);  // the rows below the crop are never decoded
  return 0;
}

// Pillow's decode has no DCT scaling (no draft()): the crop of a full-scale decode, the rows
// above it skipped and the columns outside it cut as in jpeg_render (with its 2-column
// margin, so the crop's pixels equal a full decode), then Pillow's resize (PilStream). The
// decoder measurement switches do not apply: Pillow decodes with ISLOW and fancy upsampling.
// The decode window of a region decode: columns [left, right) of the (scaled) image, which
// jpeg_crop_scanline widens to iMCU edges (*xoff, *cw: what it chose), a row buffer for them
// and the rows above y0 skipped (entropy-decoded only: no IDCT, no colour conversion).
static int open_window(jpeg_decompress_struct& ci, const CropDecode& g, int left, int right, int y0, Scratch& s,
                       JDIMENSION* xoff, JDIMENSION* cw) {
  const int bpp = g.bpp;
  crop_columns(ci, g, left, right, xoff, cw);
  const size_t in_row = (size_t)*cw * bpp;
  if (s.rows.size() < in_row + 16) s.rows.resize(in_row + 16);
  if (bpp == 4 && s.cmyk.size() < (size_t)*cw * 3) s.cmyk.resize((size_t)*cw * 3);
  return skip_to(ci, g, y0);
}

int jpeg_render_pil(const uint8_t* data, size_t len, const uint16_t crop[4], bool flip, int oh, int ow, bool bicubic,
                    bool pillow13, Scratch& s, uint8_t* out) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  CropDecode g;
  if (start_crop_decode(d, data, len, crop, oh, ow, kDctOff, false, s, &g)) return -1;
  jpeg_decompress_struct& ci = d.cinfo;
  const int t = g.t, l = g.l, SW = g.SW, bpp = g.bpp;
  PilStream ps;
  ps.begin(g.bh, g.bw, oh, ow, bicubic, flip, pillow13, s.pil, out, s.direct, s.win_y0, s.win_y1);
  if (ps.row_hi <= ps.row_lo) {
    jpeg_abort_decompress(&ci);
    return 0;
  }
  const int left = std::max(0, l + ps.col_lo - 2), right = std::min(SW, l + ps.col_hi + 2);
  const int y0 = t + ps.row_lo, y1 = t + ps.row_hi;
  JDIMENSION xoff, cw;
  if (open_window(ci, g, left, right, y0, s, &xoff, &cw)) return -1;
  for (int y = y0; y < y1; ++y) {
    JSAMPROW p = s.rows.data();
    if (jpeg_read_scanlines(&ci, &p, 1) != 1) return fail("bad JPEG: no data at row %d", y);
    const uint8_t* rgb = p;
    if (bpp == 4) {
      cmyk_to_rgb(p, s.cmyk.data(), (int)cw);
      rgb = s.cmyk.data();
    }
    ps.push(y - t, rgb + (size_t)(l + ps.col_lo - (int)xoff) * 3);
  }
  jpeg_abort_decompress(&ci);  // nothing below the crop's last needed row is decoded
  return 0;
}

int jpeg_crop_floor(const uint8_t* data, size_t len, const uint16_t crop[4], int oh, int ow, int dct, Scratch& s,
                    uint8_t* out, int64_t out_cap, int32_t region[4]) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  CropDecode g;
  if (start_crop_decode(d, data, len, crop, oh, ow, dct, false, s, &g)) return -1;
  jpeg_decompress_struct& ci = d.cinfo;
  const int t = g.t, l = g.l, bh = g.bh, bw = g.bw, M = g.M, SH = g.SH, SW = g.SW, bpp = g.bpp;
  // the crop in scaled pixels (as jpeg_render: scaled pixel k covers source [8k/M, 8(k+1)/M))
  const int xlo = (int)((int64_t)l * M / 8), xhi = std::min(SW, (int)(((int64_t)(l + bw) * M + 7) / 8));
  const int ylo = (int)((int64_t)t * M / 8), yhi = std::min(SH, (int)(((int64_t)(t + bh) * M + 7) / 8));
  region[0] = ylo;
  region[1] = xlo;
  region[2] = yhi - ylo;
  region[3] = xhi - xlo;
  const int rw = xhi - xlo;
  if (out && (out_cap < 0 || (uint64_t)out_cap < (uint64_t)(yhi - ylo) * (uint64_t)rw * 3))
    return fail("bad JPEG: %dx%d region does not fit its %lld-byte buffer", yhi - ylo, rw, (long long)out_cap);
  // 2 columns of margin, as jpeg_render: the edge columns of a cropped decode are upsampled
  // without their outer neighbour's chroma, so the region's own pixels equal a full decode
  const int left = std::max(0, xlo - 2), right = std::min(SW, xhi + 2);
  JDIMENSION xoff, cw;
  if (open_window(ci, g, left, right, ylo, s, &xoff, &cw)) return -1;
  for (int y = ylo; y < yhi; ++y) {
    JSAMPROW p = s.rows.data();
    if (jpeg_read_scanlines(&ci, &p, 1) != 1) return fail("bad JPEG: no data at row %d", y);
    if (!out) continue;
    const uint8_t* rgb = p;
    if (bpp == 4) {
      cmyk_to_rgb(p, s.cmyk.data(), (int)cw);
      rgb = s.cmyk.data();
    }
    std::memcpy(out + (size_t)(y - ylo) * rw * 3, rgb + (size_t)(xlo - (int)xoff) * 3, (size_t)rw * 3);
  }
  jpeg_abort_decompress(&ci);  // nothing below the crop's last row is decoded
  return 0;
}

int jpeg_decode_full(const uint8_t* data, size_t len, int denom, uint8_t* out, int64_t out_cap, Scratch& s, int* oh,
                     int* ow) {
  Decoder d;
  if (setjmp(d.err.jump)) return fail("bad JPEG: %s", d.err.msg);
  if (data == nullptr || len < 4) return fail("bad JPEG: empty or too short (%zu bytes)", len);
  if (begin(d, data, len)) return -1;
  jpeg_decompress_struct& ci = d.cinfo;
  ci.scale_num = 1;
  ci.scale_denom = (unsigned)denom;
  jpeg_start_decompress(&ci);
  const int SH = (int)ci.output_height, SW = (int)ci.output_width;
  const int bpp = out_bytes_per_pixel(ci);
  if (bpp < 0) return fail("bad JPEG: %d output components", ci.output_components);
  const size_t row_bytes = (size_t)SW * 3;
  if (out && (out_cap < 0 || (uint64_t)out_cap < (uint64_t)row_bytes * (uint64_t)SH))
    return fail("bad JPEG: %dx%d output does not fit its %lld-byte buffer", SH, SW, (long long)out_cap);
  uint8_t* dst = out;
  if (dst == nullptr) {  // decode-only: one row buffer, overwritten
    if (s.rows.size() < row_bytes) s.rows.resize(row_bytes);
  }
  if (bpp == 4 && s.cmyk.size() < (size_t)SW * 4) s.cmyk.resize((size_t)SW * 4);
  while ((int)ci.output_scanline < SH) {
    const int y = (int)ci.output_scanline;
    uint8_t* rgb = dst ? dst + (size_t)y * row_bytes : s.rows.data();
    JSAMPROW p = bpp == 4 ? s.cmyk.data() : rgb;
    if (jpeg_read_scanlines(&ci, &p, 1) != 1) return fail("bad JPEG: no data at row %d", y);
    if (bpp == 4) cmyk_to_rgb(p, rgb, SW);
  }
  jpeg_finish_decompress(&ci);
  *oh = SH;
  *ow = SW;
  return 0;
}

// A compressor writing into a buffer libjpeg grows (jpeg_mem_dest); the buffer is freed with
// it. start() after the caller's setjmp: errors go to `err`.
struct MemEncoder {
  jpeg_compress_struct c;
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  volatile bool created = false;
  void start(jpeg_error_mgr* err) {
    c.err = err;
    jpeg_create_compress(&c);
    created = true;
    jpeg_mem_dest(&c, &buf, &size);
  }
  ~MemEncoder() {
    if (created) jpeg_destroy_compress(&c);
    free(buf);
  }
};

// Test hook: encode an h x w image of `components` channels (1 grayscale, 3 RGB, 4 CMYK) as
// JPEG with libjpeg's own options (Pillow cannot write arithmetic coding) into out (cap
// bytes); *out_len = its size. subsample: 1 = 4:2:0, 0 = 4:4:4.
int jpeg_encode_test(const uint8_t* px, int h, int w, int components, int quality, int progressive, int arith,
                     int subsample, uint8_t* out, int64_t cap, int64_t* out_len) {
  if (!px || !out || !out_len || h < 1 || w < 1 || (components != 1 && components != 3 && components != 4))
    return fail("jpeg_encode_test: bad arguments");
  struct Enc : MemEncoder {
    ErrMgr err;
  } e;
  jpeg_std_error(&e.err.pub);
  e.err.pub.error_exit = on_error;
  e.err.pub.output_message = on_output;
  if (setjmp(e.err.jump)) return fail("jpeg_encode_test: %s", e.err.msg);
  e.start(&e.err.pub);
  e.c.image_width = (JDIMENSION)w;
  e.c.image_height = (JDIMENSION)h;
  e.c.input_components = components;
  e.c.in_color_space = components == 1 ? JCS_GRAYSCALE : (components == 3 ? JCS_RGB : JCS_CMYK);
  jpeg_set_defaults(&e.c);
  jpeg_set_quality(&e.c, quality, TRUE);
  if (components == 3 && !subsample)
    for (int c = 0; c < 3; ++c) e.c.comp_info[c].h_samp_factor = e.c.comp_info[c].v_samp_factor = 1;
  if (progressive) jpeg_simple_progression(&e.c);
  e.c.arith_code = arith ? TRUE : FALSE;
  jpeg_start_compress(&e.c, TRUE);
  while (e.c.next_scanline < e.c.image_height) {
    JSAMPROW row = const_cast<JSAMPROW>(px + (size_t)e.c.next_scanline * w * components);
    jpeg_write_scanlines(&e.c, &row, 1);
  }
  jpeg_finish_compress(&e.c);
  *out_len = (int64_t)e.size;
  if ((int64_t)e.size > cap) return fail("jpeg_encode_test: %lu bytes do not fit %lld", e.size, (long long)cap);
  std::memcpy(out, e.buf, e.size);
  return 0;
}

int64_t jpeg_slice_count() { return g_slices.load(); }

constexpr int kRestartMcus = 4;

// MCUs per restart interval for a row of `per_row` MCUs: a divisor of the row (the slice cuts
// every MCU row at the same interval boundaries): the first one in [4, 8], else the largest
// below 4. Before, the first divisor >= 4 was taken however large: rows of 22 MCUs (352-pixel
// 4:2:0 images) got 11-MCU intervals and prime rows (e.g. 19, 23, 29, 31) none to cut at.
// Measured (render of RandomResizedCrop records at 224, one thread, two runs): 22 MCUs at 2,
// 1.07-1.10x (1.9% more bytes); 19 at 1, 1.03-1.07x (4.9% more bytes); 21 at 3 instead of 7
// was 0.96x, so 7 stays. A row of at most 8 MCUs is one interval.
int restart_mcus(int per_row) {
  if (per_row <= 2 * kRestartMcus) return std::max(per_row, 1);
  for (int d = kRestartMcus; d <= 2 * kRestartMcus; ++d)
    if (per_row % d == 0) return d;
  for (int d = kRestartMcus - 1; d > 1; --d)
    if (per_row % d == 0) return d;
  return 1;
}

int jpeg_add_restarts(const uint8_t* data, size_t len, uint8_t* out, int64_t cap, int64_t* out_len) {
  if (!data || !out_len || len < 4 || cap < 0) return fail("jpeg_add_restarts: bad arguments");
  *out_len = 0;
  SliceHeader sh;
  if (slice_header(data, len, &sh)) return 1;  // already sliceable
  struct Tx : MemEncoder {
    Decoder d;  // owns the coefficient arrays the compressor reads (both done before either goes)
  } x;
  // one error manager for both: a failure on either side longjmps here
  if (setjmp(x.d.err.jump)) return fail("bad JPEG: %s", x.d.err.msg);
  jpeg_create_decompress(&x.d.cinfo);
  x.d.created = true;
  jpeg_mem_src(&x.d.cinfo, data, (unsigned long)len);
  for (int m = 1; m < 16; ++m) jpeg_save_markers(&x.d.cinfo, JPEG_APP0 + m, 0xFFFF);
  jpeg_save_markers(&x.d.cinfo, JPEG_COM, 0xFFFF);
  jpeg_read_header(&x.d.cinfo, TRUE);
  jpeg_decompress_struct& ci = x.d.cinfo;
  if (ci.arith_code) return 1;
  if (check_limits(ci.image_width, ci.image_height, data, len, ci.mem)) return -1;
  jvirt_barray_ptr* coef = jpeg_read_coefficients(&ci);
  x.start(&x.d.err.pub);
  jpeg_copy_critical_parameters(&ci, &x.c);
  // A restart marker every ~4 MCUs (64 pixels of 4:2:0), a divisor of the row: the loader can
  // start at any MCU row and cut the columns to whole intervals. Measured on ~500x375 q90
  // photos: ~1.5% more bytes than one marker per row, Huffman tables optimized (~3% fewer).
  {
    int hmax = 1;
    for (int c = 0; c < ci.num_components; ++c) hmax = std::max(hmax, ci.comp_info[c].h_samp_factor);
    if (ci.num_components == 1) hmax = 1;
    const int per_row = (int)((ci.image_width + 8 * hmax - 1) / (8 * hmax));
    x.c.restart_interval = (unsigned)std::min(restart_mcus(per_row), 65535);
  }
  x.c.optimize_coding = TRUE;
  jpeg_write_coefficients(&x.c, coef);
  for (jpeg_saved_marker_ptr m = ci.marker_list; m; m = m->next) {
    // libjpeg writes its own Adobe marker where the colour space needs one
    if (m->marker == JPEG_APP0 + 14 && m->data_length >= 5 && !std::memcmp(m->data, "Adobe", 5)) continue;
    jpeg_write_marker(&x.c, m->marker, m->data, m->data_length);
  }
  jpeg_finish_compress(&x.c);
  jpeg_finish_decompress(&ci);
  *out_len = (int64_t)x.size;
  if ((int64_t)x.size <= cap && out) std::memcpy(out, x.buf, x.size);
  return 0;
}

}  // namespace fl
#endif  // FASTLOAD_HAVE_JPEG
