// Pillow's Image.resize (libImaging Resample.c) for uint8 RGB, fused with the crop and the
// horizontal flip: what torchvision's F.resized_crop does to a PIL image (integer crop, then
// img.resize(size, resample) with no reducing_gap), which the PIL training replays of ml-dr and
// DataCompDR run. Byte-exact with Pillow: the coefficients are computed with Pillow's double
// expressions in Pillow's order, rounded to Pillow's 22-bit fixed point, and each pass rounds
// to uint8 as Pillow's does. The reference is fastload/replay/reference_pil.py.

// Pillow's wheels are built for baseline x86-64 (no FMA): a * b + c is two roundings there.
// This library is built with -march=native, where GCC would fuse them into one fma and
// change the weights in the last bit (which the fixed-point rounding can expose).
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fl_common.h"
#include "replay_impl.h"

namespace fl {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS

inline double pil_bilinear(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

inline double pil_bicubic(double x) {  // Keys cubic, a = -0.5, written as Pillow evaluates it
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's clip8: the lookup table of Resample.c is this clamp of the arithmetic shift.
inline uint8_t clip8(int32_t v) {
  const int32_t s = v >> kPrecisionBits;
  return (uint8_t)(s < 0 ? 0 : (s > 255 ? 255 : s));
}

}  // namespace

void pil_axis(int in, int out, bool bicubic, PilAxis& a) {
  // Pillow's box is float[4]: (in1 - in0) is a float subtraction, then widened
  const float in0 = 0.0f, in1 = (float)in;
  const double scale = (double)(in1 - in0) / out;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = (bicubic ? 2.0 : 1.0) * filterscale;
  const int ksize = (int)std::ceil(support) * 2 + 1;
  const double inv_filterscale = 1.0 / filterscale;
  a.out = out;
  a.ksize = ksize;
  a.start.resize(out);
  a.count.resize(out);
  a.k.assign((size_t)out * ksize, 0);
  double w[512];
  std::vector<double> wbig;
  double* wp = w;
  if (ksize > 512) {  // downscales of > 128x (bicubic): rare, but no fixed limit
    wbig.resize(ksize);
    wp = wbig.data();
  }
  for (int xx = 0; xx < out; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = (int)(center - support + 0.5);  // truncation toward zero, as Pillow's cast
    if (xmin < 0) xmin = 0;
    int xmax = (int)(center + support + 0.5);
    if (xmax > in) xmax = in;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double v = (x + xmin - center + 0.5) * inv_filterscale;
      wp[x] = bicubic ? pil_bicubic(v) : pil_bilinear(v);
      ww += wp[x];
    }
    if (ww != 0.0)
      for (int x = 0; x < xmax; ++x) wp[x] /= ww;  // a division, as Pillow (not * 1/ww)
    int32_t* k = &a.k[(size_t)xx * ksize];
    for (int x = 0; x < xmax; ++x)  // normalize_coeffs_8bpc: round half away from zero
      k[x] = wp[x] < 0 ? (int32_t)(-0.5 + wp[x] * (1 << kPrecisionBits))
                       : (int32_t)(0.5 + wp[x] * (1 << kPrecisionBits));
    a.start[xx] = xmin;
    a.count[xx] = xmax;
  }
}

void PilStream::begin(int bh, int bw, int oh, int ow, bool bicubic, bool flip, bool pillow13, PilScratch& s,
                      uint8_t* out, const DirectOut* direct, int win_y0, int win_y1) {
  s_ = &s;
  out_ = out;
  direct_ = direct;
  bw_ = bw;
  oh_ = oh;
  ow_ = ow;
  flip_ = flip;
  // ImagingResampleInner with box (0, 0, bw, bh): a pass runs only when its axis changes size
  hpass_ = ow != bw;
  vpass_ = oh != bh;
  // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as
  // many pixels as the width (Pillow <= 12: always horizontal first)
  hfirst_ = !pillow13 || !((bh - oh) > 0 && (bh - oh) > (bw - ow) * 2);
  y0_ = 0;
  y1_ = oh;
  if (win_y1 > win_y0) {
    y0_ = std::max(0, win_y0);
    y1_ = std::min(oh, win_y1);
    if (y1_ < y0_) y1_ = y0_;
  }
  next_y_ = y0_;
  if (vpass_) pil_axis(bh, oh, bicubic, s.ay);
  if (hpass_) pil_axis(bw, ow, bicubic, s.ax);
  // the crop rows the output rows [y0_, y1_) read
  row_lo = bh;
  row_hi = 0;
  for (int y = y0_; y < y1_; ++y) {
    row_lo = std::min(row_lo, vpass_ ? s.ay.start[y] : y);
    row_hi = std::max(row_hi, vpass_ ? s.ay.start[y] + s.ay.count[y] : y + 1);
  }
  if (row_hi <= row_lo) row_lo = row_hi = 0;
  col_lo = 0;
  col_hi = bw;
  if (hpass_) {
    col_lo = bw;
    col_hi = 0;
    for (int x = 0; x < ow; ++x) {
      col_lo = std::min(col_lo, s.ax.start[x]);
      col_hi = std::max(col_hi, s.ax.start[x] + s.ax.count[x]);
    }
  }
  // The vertical pass reads a ring of ay.ksize rows: horizontally resized ones (horizontal
  // first), else crop rows [col_lo, col_hi).
  ring_w_ = (hfirst_ && hpass_ ? ow : col_hi - col_lo) * 3;
  if (vpass_ && s.ring.size() < (size_t)s.ay.ksize * ring_w_) s.ring.resize((size_t)s.ay.ksize * ring_w_);
  const size_t row_need = (size_t)std::max(ow, col_hi - col_lo) * 3;
  if (s.row.size() < 2 * row_need) s.row.resize(2 * row_need);
  if (direct && s.acc.size() < (size_t)ow + 8) s.acc.resize((size_t)ow + 8);
}

void PilStream::hpass(const uint8_t* row, uint8_t* dst) const {
  const PilAxis& a = s_->ax;
  const int K = a.ksize;
  for (int xx = 0; xx < ow_; ++xx) {
    const uint8_t* p = row + (size_t)(a.start[xx] - col_lo) * 3;
    const int32_t* k = &a.k[(size_t)xx * K];
    const int n = a.count[xx];
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int x = 0; x < n; ++x) {
      s0 += p[3 * x] * k[x];
      s1 += p[3 * x + 1] * k[x];
      s2 += p[3 * x + 2] * k[x];
    }
    dst[3 * xx] = clip8(s0);
    dst[3 * xx + 1] = clip8(s1);
    dst[3 * xx + 2] = clip8(s2);
  }
}

void PilStream::emit(int y, const uint8_t* hwc) {
  const int ow = ow_;
  if (direct_) {
    // emit_direct loads 32-byte aligned vectors
    float* acc = s_->acc.data();
    acc += ((32 - ((uintptr_t)acc & 31)) & 31) / sizeof(float);
    for (int c = 0; c < 3; ++c) {
      for (int x = 0; x < ow; ++x) acc[flip_ ? ow - 1 - x : x] = (float)hwc[3 * x + c];
      emit_direct(*direct_, c, acc, (size_t)y * ow, ow);
    }
    return;
  }
  uint8_t* o = out_ + (size_t)y * 3 * ow;
  for (int c = 0; c < 3; ++c)
    for (int x = 0; x < ow; ++x) o[c * ow + (flip_ ? ow - 1 - x : x)] = hwc[3 * x + c];
}

void PilStream::push(int y, const uint8_t* row) {
  if (y < row_lo || y >= row_hi) return;
  PilScratch& s = *s_;
  uint8_t* tmp = s.row.data();
  if (!vpass_) {  // output row y is crop row y, resized horizontally or not at all
    if (y < y0_ || y >= y1_) return;
    if (hpass_) {
      hpass(row, tmp);
      row = tmp;
    }
    emit(y, row);
    return;
  }
  const PilAxis& a = s.ay;
  const int K = a.ksize;
  uint8_t* slot = s.ring.data() + (size_t)(y % K) * ring_w_;
  if (hfirst_ && hpass_)
    hpass(row, slot);
  else
    std::memcpy(slot, row, (size_t)ring_w_);
  // every output row whose last tap is row y (bounds are nondecreasing in the output row)
  while (next_y_ < y1_ && a.start[next_y_] + a.count[next_y_] - 1 <= y) {
    const int yy = next_y_++;
    const int32_t* k = &a.k[(size_t)yy * K];
    const int s0 = a.start[yy], n = a.count[yy];
    const uint8_t* rows[64];
    std::vector<const uint8_t*> rows_big;
    const uint8_t** rp = rows;
    if (n > 64) {
      rows_big.resize(n);
      rp = rows_big.data();
    }
    for (int j = 0; j < n; ++j) rp[j] = s.ring.data() + (size_t)((s0 + j) % K) * ring_w_;
    uint8_t* v = tmp + (size_t)std::max(ow_, col_hi - col_lo) * 3;
    for (int i = 0; i < ring_w_; ++i) {
      int32_t acc = 1 << (kPrecisionBits - 1);
      for (int j = 0; j < n; ++j) acc += rp[j][i] * k[j];
      v[i] = clip8(acc);
    }
    if (!hfirst_ && hpass_) {  // vertical first: then the horizontal pass of this row
      hpass(v, tmp);
      emit(yy, tmp);
    } else {
      emit(yy, v);
    }
  }
}

}  // namespace fl
