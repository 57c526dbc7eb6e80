// Internals of the replay library shared by its .cpp files (not a public ABI).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fl_aug.h"

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace fl {

// One axis of a separable antialiased resize, torch's `_upsample_*_aa` rule: output i reads
// input taps [start[i], start[i] + count[i]) with weights w[i * K ...] (normalized to sum 1).
// The source region is [x0, x0 + len) in input pixels (fractional after DCT scaling) and taps
// are clamped to the integer pixels [lo, hi), as torch clamps to the cropped tensor.
struct AxisWeights {
  int out = 0, K = 0;
  int taps = 0;  // > 0: every output has exactly this many taps (zero-padded)
  int KP = 0;    // int16 weight pairs per output (taps > 0)
  std::vector<int32_t> wpair;
  // AVX2 layout of wpair for groups of 8 outputs x = 8g + j (j < 4) paired with x + 4: per
  // (g, j, pair p) 8 int32 = wpair(x, p) x 4, wpair(x + 4, p) x 4.
  std::vector<int32_t> wvec;
  std::vector<int32_t> off3;  // 3 * start[i]: byte offset of each output's first tap (taps > 0)
  int tap_lo = 0, tap_hi = 0;  // union of all taps
  std::vector<int> start, count;
  std::vector<float> w;
};

// int16: also build the pmaddwd tables (wpair, wvec, off3) of the horizontal pass.
void compute_axis_weights(int out, double x0, double len, int lo, int hi, bool bicubic, AxisWeights& aw,
                          bool int16);

// float -> IEEE half, round to nearest even (portable: no F16C requirement).
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return (uint16_t)(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (mag >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // overflow -> inf
  if (mag < 0x38800000u) {                                     // subnormal or zero
    if (mag < 0x33000000u) return (uint16_t)sign;
    uint32_t e = mag >> 23, m = (mag & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 - (e - 127) + ... -> places the value in 10 bits
    uint32_t h = m >> (shift);
    uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((mag - 0x38000000u) >> 13);
  uint32_t rem = mag & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return (uint16_t)(sign | h);
}

// Fixed-point unit of the horizontal pass: its outputs are values * kOne.
constexpr int kOne = 1 << 14;

// Horizontal pass of one uint8 RGB row: row points at input column `col_base`; writes the
// row planar (out R floats, out G, out B; mirrored when flip), in units of 1/kOne, to dst.
// safe_bytes: how many bytes from `row` may be read (wide loads read past the last tap).
void resize_row_h(const uint8_t* row, int col_base, const AxisWeights& ax, bool flip, float* dst,
                  int64_t safe_bytes);

// Round half-even and clamp (below).
inline void store_u8(const float* v, uint8_t* o, int n);

// Where a finished row goes when it skips the uint8 image (no RandAugment, no mixing): it
// is rounded to uint8 values, normalized (v * scale + bias) and written to the NCHW output.
struct DirectOut {
  int dtype;         // 0 float32, 1 float16, 2 uint8
  void* planes[3];   // channel planes of this sample (row 0)
  float scale[3], bias[3];
};

// Streaming vertical pass: horizontally resized input rows go into a ring of ay.K rows
// (cache resident); each output row is produced as soon as its last input row is in.
struct VStream {
  const AxisWeights* ay = nullptr;
  int row_len = 0, R = 1, next_y = 0;
  int end_y = 0;  // rows [next_y, end_y) are emitted (begin: all)
  float* ring = nullptr;
  uint8_t* out = nullptr;
  const DirectOut* direct = nullptr;  // when set, rows go to the output instead of `out`
  void begin(const AxisWeights* a, int row_len, std::vector<float>& buf, uint8_t* out);
  float* slot(int r) { return ring + (size_t)(r % R) * row_len; }
  // Emit only output rows [y0, y1) (clamped); [*rlo, *rhi) = the input rows they read.
  void window(int y0, int y1, int* rlo, int* rhi);
  void row_done(int r);
  void vertical_taps(const float* w, int n, float inv, int s0, int c0, int m, float* acc);
  template <typename T>  // float (float32 output) or uint16_t (float16)
  void emit_fused(const float* w, int n, float inv, int s0, int y, int ow, float* acc);  // input row r (absolute) is in slot(r): emit the rows it completes
};

// Round half-even and clamp to [0, 255] (torch's round + clamp + to(uint8)): cvtps2dq
// rounds with the default (nearest-even) mode, the saturating packs clamp.
inline void store_u8(const float* v, uint8_t* o, int n) {
  int i = 0;
#if defined(__SSE4_1__)
  for (; i + 16 <= n; i += 16) {
    __m128i a = _mm_cvtps_epi32(_mm_loadu_ps(v + i));
    __m128i b = _mm_cvtps_epi32(_mm_loadu_ps(v + i + 4));
    __m128i c = _mm_cvtps_epi32(_mm_loadu_ps(v + i + 8));
    __m128i d = _mm_cvtps_epi32(_mm_loadu_ps(v + i + 12));
    _mm_storeu_si128((__m128i*)(o + i), _mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)));
  }
#endif
  for (; i < n; ++i) {
    float x = v[i];
    x = x > 0.f ? x : 0.f;
    x = x < 255.f ? x : 255.f;
    o[i] = (uint8_t)__builtin_lrintf(x);
  }
}

// Round, clamp and normalize m values of channel c into the DirectOut planes at offset off
// (resize.cpp; the Pillow path hands it exact integers, which the rounding keeps).
void emit_direct(const DirectOut& D, int c, const float* acc, size_t off, int m);

// One axis of Pillow's resampling (libImaging Resample.c, precompute_coeffs +
// normalize_coeffs_8bpc) for box (0, in): output i reads taps [start[i], start[i] + count[i])
// with fixed-point weights k[i * ksize ...] (PRECISION_BITS = 22).
struct PilAxis {
  int out = 0, ksize = 0;
  std::vector<int> start, count;
  std::vector<int32_t> k;
};
void pil_axis(int in, int out, bool bicubic, PilAxis& a);

// Working memory of the Pillow resize (part of Scratch).
struct PilScratch {
  PilAxis ax, ay;
  std::vector<uint8_t> ring;  // the rows the vertical pass reads (ay.ksize of them)
  std::vector<uint8_t> row;   // one vertical-pass row (vertical first) / one output row
  std::vector<float> acc;     // one output channel row as floats (DirectOut)
};

// Pillow's Image.resize of a bh x bw crop to oh x ow, then a horizontal flip, streamed: the
// caller pushes crop rows [row_lo, row_hi) in order, each pointing at crop column col_lo
// (columns [col_lo, col_hi) are read). Pillow's two passes (each rounds to uint8) in Pillow's
// order, each skipped as Pillow skips it when its axis keeps its size; rows go to `out`
// (row-planar uint8, as render_u8) or to `direct`; only output rows [win_y0, win_y1) when
// win_y1 > win_y0.
struct PilStream {
  int row_lo = 0, row_hi = 0, col_lo = 0, col_hi = 0;
  void begin(int bh, int bw, int oh, int ow, bool bicubic, bool flip, bool pillow13, PilScratch& s, uint8_t* out,
             const DirectOut* direct, int win_y0, int win_y1);
  void push(int y, const uint8_t* row);

 private:
  PilScratch* s_ = nullptr;
  uint8_t* out_ = nullptr;
  const DirectOut* direct_ = nullptr;
  int bw_ = 0, oh_ = 0, ow_ = 0, y0_ = 0, y1_ = 0, next_y_ = 0, ring_w_ = 0;
  bool flip_ = false, hpass_ = false, vpass_ = false, hfirst_ = true;
  void hpass(const uint8_t* row, uint8_t* dst) const;  // row at crop column col_lo
  void emit(int y, const uint8_t* hwc);                // one finished output row (unflipped)
};

// A source: a JPEG stream (kind 0) or a raw uint8 HWC image of h x w (kind 1).
struct Source {
  const uint8_t* data;
  int64_t len;
  int32_t h, w;
  int32_t kind, pad;
};

// Per-thread working memory, grown on demand and reused across samples and calls.
struct Scratch {
  std::vector<float> tmp;       // ring of horizontally resized rows
  std::vector<uint8_t> rows;    // decoded JPEG scanlines
  std::vector<uint8_t> cmyk;    // CMYK scanlines before their conversion to RGB
  std::vector<uint8_t> sub;     // the JPEG of a restart-marker slice (jpeg.cpp, build_slice)
  std::vector<size_t> sub_iv;   // its restart intervals' (start, end) in the source
  AxisWeights ax, ay;
  PilScratch pil;
  const DirectOut* direct = nullptr;  // see DirectOut; set by the caller per render
  // Output row window of the next render (win_y1 > win_y0: only rows [win_y0, win_y1) are
  // written, and only the input rows they read are decoded; the other rows of `out` are left
  // as they were). CutMix-only partners need just the rows of the box. Reset by the caller.
  int win_y0 = 0, win_y1 = 0;
};

// Crop (quantized box) -> resize -> flip of one source into out, uint8 in "row-planar"
// layout: row y holds ow R values, then ow G, then ow B (out[(y * 3 + c) * ow + x]).
// dct: DCT scaling rule and decoder options (DctRule | kDct* bits, below). Returns 0 or fl::fail(...).
// resize: a ReplayOptions::resize id (kResizeTorch: torch's antialiased float resize, JPEGs
// decoded at the DCT scale the rule picks; kResizePil/kResizePil12: Pillow's, full-scale decode).
int render_u8(const Source& src, const uint16_t crop[4], bool flip, int oh, int ow, bool bicubic,
              int dct, int resize, Scratch& s, uint8_t* out);

// The `dct` argument of the render functions: low byte = DCT scaling rule, higher bits =
// decoder options (measurement switches).
enum DctRule { kDctOff = 0, kDctPow2 = 1, kDctM8 = 2 };
constexpr int kDctIfast = 1 << 8;    // JDCT_IFAST instead of JDCT_ISLOW
constexpr int kDctNoFancy = 1 << 9;  // do_fancy_upsampling = FALSE (merged upsampling for 4:2:x)

// JPEG support (jpeg.cpp). Header only: source height/width.
int jpeg_dims(const uint8_t* data, size_t len, int* h, int* w);
// Decodes the crop region needed by (ax, ay) at scale 1/denom and runs the fused resize.
int jpeg_render(const uint8_t* data, size_t len, const uint16_t crop[4], bool flip, int oh, int ow,
                bool bicubic, int dct, Scratch& s, uint8_t* out);
// Pillow's resize (PilStream) of the crop of a full-scale decode; pillow13: Pillow >= 13's pass order.
int jpeg_render_pil(const uint8_t* data, size_t len, const uint16_t crop[4], bool flip, int oh, int ow, bool bicubic,
                    bool pillow13, Scratch& s, uint8_t* out);
// Full decode at scale 1/denom into out (or scratch when out is null); dims returned.
int jpeg_decode_full(const uint8_t* data, size_t len, int denom, uint8_t* out, int64_t out_cap, Scratch& s, int* oh,
                     int* ow);
// The decode floor of one crop (benchmark): the rows above the crop skipped
// (jpeg_skip_scanlines: entropy decoding only, no IDCT), the columns outside it cut
// (jpeg_crop_scanline), the crop's rows decoded at the scale the loader's DCT rule picks for
// an oh x ow output, nothing after the crop's last row. region[4] = (y0, x0, h, w) in scaled
// pixels; the region's RGB pixels go to out (row-major, w * 3 bytes a row) when out is given.
int jpeg_crop_floor(const uint8_t* data, size_t len, const uint16_t crop[4], int oh, int ow, int dct, Scratch& s,
                    uint8_t* out, int64_t out_cap, int32_t region[4]);
// Decode limits (jpeg.cpp): a value < 0 (<= 0 for the first two) keeps the current one.
void set_jpeg_limits(int64_t max_pixels, int64_t max_bytes, int64_t max_pixels_per_byte, int64_t free_pixels);
void get_jpeg_limits(int64_t* v);  // v[4]: max_pixels, max_bytes, max_pixels_per_byte, free_pixels
int jpeg_encode_test(const uint8_t* px, int h, int w, int components, int quality, int progressive, int arith,
                     int subsample, uint8_t* out, int64_t cap, int64_t* out_len);
int jpeg_scaled_dims(const uint8_t* data, size_t len, int denom, int* oh, int* ow);
// Lossless transcode of a baseline or progressive Huffman JPEG to baseline with a restart
// marker opening every MCU row and optimized Huffman tables (the decoded pixels are
// unchanged: same coefficients, same tables); markers (EXIF, ICC, comments) kept. Returns 0
// (*out_len = size; > cap: nothing written, call again with that capacity), 1 (not
// applicable: arithmetic coding, a restart interval already dividing the row) or fl::fail.
int jpeg_add_restarts(const uint8_t* data, size_t len, uint8_t* out, int64_t cap, int64_t* out_len);
int64_t jpeg_slice_count();  // renders decoded from a restart-marker slice so far (tests)

}  // namespace fl
