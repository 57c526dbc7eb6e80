// RandAugment's 14 ops as torchvision's RandAugment applies them to PIL images
// (randaugment_semantics="pil"): torchvision's _apply_op on a PIL image calls Pillow, so the
// pixels are Pillow's. On an interleaved RGB uint8 image, in place.
//
// Exactness notes (what Pillow computes, which these functions reproduce):
// - Geometry (ShearX/Y, TranslateX/Y, Rotate): Image.transform(AFFINE, NEAREST) with the
//   matrix torchvision's F.affine builds (_get_inverse_affine_matrix in double, pixel
//   coordinates, centre (0, 0) for shears, (w/2, h/2) for translations) or Image.rotate's own
//   (cos/sin rounded to 15 decimals, as Python's round()). Pillow samples a matrix with no
//   cross terms through its "scale" path (double accumulation, COORD truncation) and any
//   other through 16.16 fixed point when the corners fit (always for images < 32768 px), else
//   double accumulation. Outside pixels are the fill, 0.
// - Blends (Brightness, Color, Contrast, Sharpness): ImageEnhance = Image.blend(degenerate,
//   image, factor) in float32: in1 + alpha * (in2 - in1), truncated (clipped outside [0, 1]).
//   Grey is Pillow's L = (19595 r + 38470 g + 7471 b + 0x8000) >> 16; Contrast's degenerate is
//   int(mean(L) + 0.5); Sharpness' is the SMOOTH filter (round(S/13), borders kept).
// - AutoContrast: ImageOps' table int(i * scale + offset) in double; Equalize, Posterize and
//   Solarize: ImageOps' tables (the same values as torchvision's tensor ops).
// No FP contraction: Pillow's own build has none (baseline x86-64, no FMA).
#pragma GCC optimize("fp-contract=off")
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "fl_common.h"

namespace fl {
namespace {

enum PilOp : int {
  kIdentity = 0, kShearX, kShearY, kTranslateX, kTranslateY, kRotate, kBrightness, kColor,
  kContrast, kSharpness, kPosterize, kSolarize, kAutoContrast, kEqualize
};

constexpr double kPi = 3.14159265358979323846;  // CPython's Py_MATH_PI
constexpr double kDegToRad = kPi / 180.0;
constexpr double kRadToDeg = 180.0 / kPi;

// Python's round(x, 15): the correctly rounded 15-decimal string read back (CPython uses
// dtoa for both directions; glibc's printf/strtod are correctly rounded too).
double py_round15(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15f", x);
  return std::strtod(buf, nullptr);
}

// Python's float % for a positive divisor.
double py_mod(double x, double m) {
  double r = std::fmod(x, m);
  if (r != 0.0) {
    if ((r < 0.0) != (m < 0.0)) r += m;
  } else {
    r = std::copysign(0.0, m);
  }
  return r;
}

// torchvision's _get_inverse_affine_matrix(center, angle, translate, scale=1, shear).
void tv_inverse_affine(double cx, double cy, double angle, double tx, double ty, double shx, double shy,
                       double m[6]) {
  const double rot = angle * kDegToRad;
  const double sx = shx * kDegToRad, sy = shy * kDegToRad;
  const double a = std::cos(rot - sy) / std::cos(sy);
  const double b = -std::cos(rot - sy) * std::tan(sx) / std::cos(sy) - std::sin(rot);
  const double c = std::sin(rot - sy) / std::cos(sy);
  const double d = -std::sin(rot - sy) * std::tan(sx) / std::cos(sy) + std::cos(rot);
  m[0] = d; m[1] = -b; m[2] = 0.0; m[3] = -c; m[4] = a; m[5] = 0.0;
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
  m[2] += cx;
  m[5] += cy;
}

inline int coord(double v) { return v < 0.0 ? -1 : (int)v; }  // Pillow's COORD
inline int fix16(double v) {                                   // Pillow's FIX (16.16)
  const double s = v * 65536.0 + 0.5;
  return s < 0.0 ? (int)std::floor(s) : (int)s;
}
inline bool fits_fixed(const double a[6], int x, int y) {
  return std::fabs(x * a[0] + y * a[1] + a[2]) < 32768.0 && std::fabs(x * a[3] + y * a[4] + a[5]) < 32768.0;
}

inline void put(uint8_t* out, const uint8_t* in, int w, int y, int x, int yin, int xin) {
  std::memcpy(out + ((size_t)y * w + x) * 3, in + ((size_t)yin * w + xin) * 3, 3);
}

// Image.transform(size, AFFINE, a, NEAREST) onto a zero image of the same size.
void pil_affine(uint8_t* img, int h, int w, const double a[6], uint8_t* scratch) {
  const size_t n = (size_t)h * w * 3;
  std::memcpy(scratch, img, n);
  std::memset(img, 0, n);
  const uint8_t* in = scratch;
  if (a[1] == 0 && a[3] == 0) {  // ImagingScaleAffine
    // xintab: the input column of every output column (or -1 outside)
    double xo = a[2] + a[0] * 0.5;
    double yo = a[5] + a[4] * 0.5;
    int* xin = (int*)std::malloc(sizeof(int) * (size_t)w);
    if (xin == nullptr) throw std::bad_alloc();
    for (int x = 0; x < w; ++x) {
      const int v = coord(xo);
      xin[x] = (v >= 0 && v < w) ? v : -1;
      xo += a[0];
    }
    for (int y = 0; y < h; ++y) {
      const int yi = coord(yo);
      if (yi >= 0 && yi < h)
        for (int x = 0; x < w; ++x)
          if (xin[x] >= 0) put(img, in, w, y, x, yi, xin[x]);
      yo += a[4];
    }
    std::free(xin);
    return;
  }
  if (fits_fixed(a, 0, 0) && fits_fixed(a, w, h) && fits_fixed(a, 0, h) && fits_fixed(a, w, 0)) {
    const int a0 = fix16(a[0]), a1 = fix16(a[1]), a3 = fix16(a[3]), a4 = fix16(a[4]);
    int a2 = fix16(a[2] + a[0] * 0.5 + a[1] * 0.5);
    int a5 = fix16(a[5] + a[3] * 0.5 + a[4] * 0.5);
    for (int y = 0; y < h; ++y) {
      int xx = a2, yy = a5;
      for (int x = 0; x < w; ++x) {
        const int xi = xx >> 16;  // arithmetic shift: floor, as Pillow's build
        if (xi >= 0 && xi < w) {
          const int yi = yy >> 16;
          if (yi >= 0 && yi < h) put(img, in, w, y, x, yi, xi);
        }
        xx += a0;
        yy += a3;
      }
      a2 += a1;
      a5 += a4;
    }
    return;
  }
  double xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
  double yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
  for (int y = 0; y < h; ++y) {
    double xx = xo, yy = yo;
    for (int x = 0; x < w; ++x) {
      const int xi = coord(xx);
      if (xi >= 0 && xi < w) {
        const int yi = coord(yy);
        if (yi >= 0 && yi < h) put(img, in, w, y, x, yi, xi);
      }
      xx += a[0];
      yy += a[3];
    }
    xo += a[1];
    yo += a[4];
  }
}

// Image.rotate(angle, NEAREST, expand=False, center=None, fillcolor=0).
void pil_rotate(uint8_t* img, int h, int w, double angle_deg, uint8_t* scratch) {
  const double angle = py_mod(angle_deg, 360.0);
  if (angle == 0.0) return;  // Pillow returns a copy
  // 90/180/270 are transposes in Pillow; no RandAugment magnitude (|angle| <= 30) reaches them
  const double cx = w / 2.0, cy = h / 2.0;
  const double r = -(angle * kDegToRad);
  double m[6] = {py_round15(std::cos(r)), py_round15(std::sin(r)), 0.0,
                 py_round15(-std::sin(r)), py_round15(std::cos(r)), 0.0};
  const double x = -cx - 0, y = -cy - 0;
  const double m2 = m[0] * x + m[1] * y + m[2];
  const double m5 = m[3] * x + m[4] * y + m[5];
  m[2] = m2 + cx;
  m[5] = m5 + cy;
  pil_affine(img, h, w, m, scratch);
}

// Image.blend(degenerate, image, factor) with degenerate given per byte (deg) or as one grey
// value per pixel (deg_px, replicated to the three channels).
inline uint8_t blend1(int in1, int in2, float alpha, bool inside) {
  const float t = (float)in1 + alpha * (float)(in2 - in1);
  if (inside) return (uint8_t)t;
  if (t <= 0.0f) return 0;
  if (t >= 255.0f) return 255;
  return (uint8_t)t;
}

void pil_blend(uint8_t* img, size_t nbytes, const uint8_t* deg, size_t deg_stride_div, double factor) {
  const float alpha = (float)factor;
  if (alpha == 0.0f) {  // Pillow returns a copy of the degenerate image
    for (size_t i = 0; i < nbytes; ++i) img[i] = deg[i / deg_stride_div];
    return;
  }
  if (alpha == 1.0f) return;
  const bool inside = alpha >= 0.0f && alpha <= 1.0f;
  for (size_t i = 0; i < nbytes; ++i) img[i] = blend1(deg[i / deg_stride_div], img[i], alpha, inside);
}

inline uint8_t pil_grey(const uint8_t* p) {
  return (uint8_t)(((uint32_t)p[0] * 19595u + (uint32_t)p[1] * 38470u + (uint32_t)p[2] * 7471u + 0x8000u) >> 16);
}

void apply_lut3(uint8_t* img, size_t npix, const uint8_t lut[3][256]) {
  for (size_t p = 0; p < npix; ++p)
    for (int c = 0; c < 3; ++c) img[p * 3 + c] = lut[c][img[p * 3 + c]];
}

void histograms(const uint8_t* img, size_t npix, uint64_t hist[3][256]) {
  std::memset(hist, 0, sizeof(uint64_t) * 3 * 256);
  for (size_t p = 0; p < npix; ++p)
    for (int c = 0; c < 3; ++c) ++hist[c][img[p * 3 + c]];
}

void pil_autocontrast(uint8_t* img, size_t npix) {
  uint64_t hist[3][256];
  histograms(img, npix, hist);
  uint8_t lut[3][256];
  for (int c = 0; c < 3; ++c) {
    int lo = 0, hi = 255;
    while (lo < 256 && !hist[c][lo]) ++lo;
    while (hi >= 0 && !hist[c][hi]) --hi;
    if (hi <= lo) {
      for (int i = 0; i < 256; ++i) lut[c][i] = (uint8_t)i;
      continue;
    }
    const double scale = 255.0 / (double)(hi - lo);
    const double offset = -(double)lo * scale;
    for (int i = 0; i < 256; ++i) {
      const double v = (double)i * scale + offset;
      long ix = (long)v;  // Python int(): toward zero
      lut[c][i] = (uint8_t)(ix < 0 ? 0 : ix > 255 ? 255 : ix);
    }
  }
  apply_lut3(img, npix, lut);
}

void pil_equalize(uint8_t* img, size_t npix) {
  uint64_t hist[3][256];
  histograms(img, npix, hist);
  uint8_t lut[3][256];
  for (int c = 0; c < 3; ++c) {
    uint64_t total = 0, last = 0;
    int nonzero = 0;
    for (int i = 0; i < 256; ++i)
      if (hist[c][i]) { total += hist[c][i]; last = hist[c][i]; ++nonzero; }
    const uint64_t step = nonzero <= 1 ? 0 : (total - last) / 255;
    if (step == 0) {
      for (int i = 0; i < 256; ++i) lut[c][i] = (uint8_t)i;
      continue;
    }
    uint64_t n = step / 2;
    for (int i = 0; i < 256; ++i) {
      const uint64_t v = n / step;
      lut[c][i] = (uint8_t)(v > 255 ? 255 : v);  // Image.point clips its table to 0..255
      n += hist[c][i];
    }
  }
  apply_lut3(img, npix, lut);
}

}  // namespace

// One op with its float magnitude (as torchvision's _apply_op receives it) on a PIL image.
// scratch holds h*w*3 bytes. Returns 0, or -1 with fl::fail() set.
int ra_pil_apply_one(uint8_t* img, int h, int w, int op, double mag, uint8_t* scratch) {
  const size_t npix = (size_t)h * w, nbytes = npix * 3;
  double m[6];
  switch (op) {
    case kIdentity:
      return 0;
    case kShearX:
    case kShearY: {
      const double deg = std::atan(mag) * kRadToDeg;
      tv_inverse_affine(0.0, 0.0, 0.0, 0.0, 0.0, op == kShearX ? deg : 0.0, op == kShearY ? deg : 0.0, m);
      pil_affine(img, h, w, m, scratch);
      return 0;
    }
    case kTranslateX:
    case kTranslateY: {
      const double t = (double)(long)mag;  // int(magnitude)
      tv_inverse_affine(w * 0.5, h * 0.5, 0.0, op == kTranslateX ? t : 0.0, op == kTranslateY ? t : 0.0,
                        0.0, 0.0, m);
      pil_affine(img, h, w, m, scratch);
      return 0;
    }
    case kRotate:
      pil_rotate(img, h, w, mag, scratch);
      return 0;
    case kBrightness: {
      static const uint8_t zero = 0;
      const float alpha = (float)(1.0 + mag);
      if (alpha == 0.0f) { std::memset(img, 0, nbytes); return 0; }
      if (alpha == 1.0f) return 0;
      const bool inside = alpha >= 0.0f && alpha <= 1.0f;
      for (size_t i = 0; i < nbytes; ++i) img[i] = blend1(zero, img[i], alpha, inside);
      return 0;
    }
    case kColor: {
      for (size_t p = 0; p < npix; ++p) scratch[p] = pil_grey(img + p * 3);
      pil_blend(img, nbytes, scratch, 3, 1.0 + mag);
      return 0;
    }
    case kContrast: {
      uint64_t sum = 0;
      for (size_t p = 0; p < npix; ++p) sum += pil_grey(img + p * 3);
      const uint8_t mean = (uint8_t)(int)((double)sum / (double)npix + 0.5);
      pil_blend(img, nbytes, &mean, nbytes + 1, 1.0 + mag);  // one value for every byte
      return 0;
    }
    case kSharpness: {
      std::memcpy(scratch, img, nbytes);  // the SMOOTH filter; borders keep their value
      if (h >= 3 && w >= 3) {
        for (int y = 1; y < h - 1; ++y)
          for (int x = 1; x < w - 1; ++x)
            for (int c = 0; c < 3; ++c) {
              int s = 0;
              for (int dy = -1; dy <= 1; ++dy)
                for (int dx = -1; dx <= 1; ++dx) s += img[((size_t)(y + dy) * w + (x + dx)) * 3 + c];
              s += 4 * img[((size_t)y * w + x) * 3 + c];
              // round(s / 13): s/13 is never within float error of a half
              scratch[((size_t)y * w + x) * 3 + c] = (uint8_t)((2 * s + 13) / 26);
            }
      }
      pil_blend(img, nbytes, scratch, 1, 1.0 + mag);
      return 0;
    }
    case kPosterize: {
      int bits = (int)mag;
      bits = bits < 0 ? 0 : bits > 8 ? 8 : bits;
      const uint8_t mask = (uint8_t)~((1 << (8 - bits)) - 1);
      for (size_t i = 0; i < nbytes; ++i) img[i] &= mask;
      return 0;
    }
    case kSolarize: {
      for (size_t i = 0; i < nbytes; ++i)
        if (!((double)img[i] < mag)) img[i] = (uint8_t)(255 - img[i]);
      return 0;
    }
    case kAutoContrast:
      pil_autocontrast(img, npix);
      return 0;
    case kEqualize:
      pil_equalize(img, npix);
      return 0;
    default:
      return fail("randaugment (pil): unknown op id %d", op);
  }
}

}  // namespace fl
