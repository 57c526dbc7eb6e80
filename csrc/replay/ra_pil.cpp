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
#include <vector>

#include "fl_aug.h"
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

// The inverse affine matrix of Image.rotate(angle) about the image centre, rounded as
// Pillow rounds it (shared by the NEAREST and the filtered rotate).
static void pil_rotate_matrix(double angle, int h, int w, double m[6]) {
  const double cx = w / 2.0, cy = h / 2.0;
  const double r = -(angle * kDegToRad);
  m[0] = py_round15(std::cos(r)); m[1] = py_round15(std::sin(r)); m[2] = 0.0;
  m[3] = py_round15(-std::sin(r)); m[4] = py_round15(std::cos(r)); m[5] = 0.0;
  const double x = -cx, y = -cy;
  const double m2 = m[0] * x + m[1] * y + m[2];
  const double m5 = m[3] * x + m[4] * y + m[5];
  m[2] = m2 + cx;
  m[5] = m5 + cy;
}

// Image.rotate(angle, NEAREST, expand=False, center=None, fillcolor=0).
void pil_rotate(uint8_t* img, int h, int w, double angle_deg, uint8_t* scratch) {
  const double angle = py_mod(angle_deg, 360.0);
  if (angle == 0.0) return;  // Pillow returns a copy
  // 90/180/270 are transposes in Pillow; no RandAugment magnitude (|angle| <= 30) reaches them
  double m[6];
  pil_rotate_matrix(angle, h, w, m);
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


// Image.transform(size, AFFINE, a, BILINEAR or BICUBIC) onto an image filled with `fill`
// (Image.new(mode, size, fillcolor); fill=0 in the core, so outside pixels keep the fill):
// Pillow's ImagingGenericTransform with bilinear_filter32RGB / bicubic_filter32RGB.
inline int pil_floor(double v) { return v < 0.0 ? (int)std::floor(v) : (int)v; }  // Pillow's FLOOR
inline int clipi(int v, int n) { return v < 0 ? 0 : (v < n ? v : n - 1); }

template <typename T>
inline double cubic(T v1, T v2, T v3, T v4, double d) {  // Pillow's BICUBIC macro (a = -1)
  const double p1 = v2;
  const double p2 = -v1 + v3;
  const double p3 = 2 * (v1 - v2) + v3 - v4;
  const double p4 = -v1 + v2 - v3 + v4;
  return p1 + d * (p2 + d * (p3 + d * p4));
}

void pil_affine_filtered(uint8_t* img, int h, int w, const double a[6], bool bicubic, const uint8_t fill[3],
                         uint8_t* scratch) {
  const size_t n = (size_t)h * w * 3;
  std::memcpy(scratch, img, n);
  const uint8_t* in = scratch;
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      uint8_t* o = img + ((size_t)y * w + x) * 3;
      const double xin = x + 0.5, yin = y + 0.5;
      double xx = a[0] * xin + a[1] * yin + a[2];
      double yy = a[3] * xin + a[4] * yin + a[5];
      if (xx < 0.0 || xx >= w || yy < 0.0 || yy >= h) {
        o[0] = fill[0]; o[1] = fill[1]; o[2] = fill[2];
        continue;
      }
      xx -= 0.5;
      yy -= 0.5;
      int xi = pil_floor(xx), yi = pil_floor(yy);
      const double dx = xx - xi, dy = yy - yi;
      if (!bicubic) {
        const size_t r0 = (size_t)clipi(yi, h) * w, c0 = (size_t)clipi(xi, w), c1 = (size_t)clipi(xi + 1, w);
        const bool has1 = yi + 1 >= 0 && yi + 1 < h;
        for (int c = 0; c < 3; ++c) {
          const int a0 = in[(r0 + c0) * 3 + c], a1 = in[(r0 + c1) * 3 + c];
          double v1 = a0 + (a1 - a0) * dx, v2 = v1;
          if (has1) {
            const size_t r1 = (size_t)(yi + 1) * w;
            const int b0 = in[(r1 + c0) * 3 + c], b1 = in[(r1 + c1) * 3 + c];
            v2 = b0 + (b1 - b0) * dx;
          }
          v1 = v1 + (v2 - v1) * dy;
          o[c] = (uint8_t)v1;
        }
        continue;
      }
      xi -= 1;
      yi -= 1;
      size_t cx[4];
      for (int k = 0; k < 4; ++k) cx[k] = (size_t)clipi(xi + k, w);
      for (int c = 0; c < 3; ++c) {
        double v[4];
        const uint8_t* row = in + (size_t)clipi(yi, h) * w * 3 + c;
        v[0] = cubic<int>(row[cx[0] * 3], row[cx[1] * 3], row[cx[2] * 3], row[cx[3] * 3], dx);
        for (int k = 1; k < 4; ++k) {
          if (yi + k >= 0 && yi + k < h) {
            row = in + (size_t)(yi + k) * w * 3 + c;
            v[k] = cubic<int>(row[cx[0] * 3], row[cx[1] * 3], row[cx[2] * 3], row[cx[3] * 3], dx);
          } else {
            v[k] = v[k - 1];
          }
        }
        const double r = cubic<double>(v[0], v[1], v[2], v[3], dy);
        o[c] = r <= 0.0 ? 0 : (r >= 255.0 ? 255 : (uint8_t)r);
      }
    }
  }
}

// Image.rotate(angle, resample, expand=False, fillcolor=fill) with BILINEAR or BICUBIC.
void pil_rotate_filtered(uint8_t* img, int h, int w, double angle_deg, bool bicubic, const uint8_t fill[3],
                         uint8_t* scratch) {
  const double angle = py_mod(angle_deg, 360.0);
  if (angle == 0.0) return;
  const size_t n = (size_t)h * w * 3;
  if (angle == 180.0 || ((angle == 90.0 || angle == 270.0) && w == h)) {  // Pillow's transposes
    std::memcpy(scratch, img, n);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        int ys, xs;
        if (angle == 180.0) { ys = h - 1 - y; xs = w - 1 - x; }
        else if (angle == 90.0) { ys = x; xs = w - 1 - y; }
        else { ys = h - 1 - x; xs = y; }
        put(img, scratch, w, y, x, ys, xs);
      }
    return;
  }
  double m[6];
  pil_rotate_matrix(angle, h, w, m);
  pil_affine_filtered(img, h, w, m, bicubic, fill, scratch);
}

// Pillow's SMOOTH filter (3x3, centre weight 5, divided by 13) into scratch; the border
// pixels keep their value (Sharpness blends the image with it).
static void pil_smooth(const uint8_t* img, int h, int w, uint8_t* scratch) {
  std::memcpy(scratch, img, (size_t)h * w * 3);
  if (h < 3 || w < 3) return;
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

// ImageEnhance.<kind>(image).enhance(factor): kind 0 Brightness, 1 Color, 2 Contrast, 3 Sharpness.
void pil_enhance(uint8_t* img, int h, int w, int kind, double factor, uint8_t* scratch) {
  const size_t npix = (size_t)h * w, nbytes = npix * 3;
  switch (kind) {
    case 0: {
      static const uint8_t zero = 0;
      pil_blend(img, nbytes, &zero, nbytes + 1, factor);
      return;
    }
    case 1:
      for (size_t p = 0; p < npix; ++p) scratch[p] = pil_grey(img + p * 3);
      pil_blend(img, nbytes, scratch, 3, factor);
      return;
    case 2: {
      uint64_t sum = 0;
      for (size_t p = 0; p < npix; ++p) sum += pil_grey(img + p * 3);
      const uint8_t mean = (uint8_t)(int)((double)sum / (double)npix + 0.5);
      pil_blend(img, nbytes, &mean, nbytes + 1, factor);
      return;
    }
    default:
      pil_smooth(img, h, w, scratch);
      pil_blend(img, nbytes, scratch, 1, factor);
      return;
  }
}

void lut_all(uint8_t* img, size_t nbytes, const uint8_t lut[256]) {
  for (size_t i = 0; i < nbytes; ++i) img[i] = lut[img[i]];
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
      pil_smooth(img, h, w, scratch);
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

// ---------------------------------------------------------------------------- timm semantics
// timm.data.auto_augment's RandAugment ops on a PIL image. level: timm's magnitude after its
// noise and clipping (the record's ra_vals, float32), turned into the op's argument in double
// as timm's *_level_to_arg functions do; negate: timm's _randomly_negate draw; bicubic: its
// resampling draw (geometric ops); fill: hparams' img_mean.
int ra_timm_apply_one(uint8_t* img, int h, int w, int op, double level, bool negate, bool bicubic,
                      const uint8_t fill[3], uint8_t* scratch) {
  const size_t nbytes = (size_t)h * w * 3;
  const double denom = 10.0;  // timm's _LEVEL_DENOM
  auto sgn = [&](double v) { return negate ? -v : v; };
  auto enhance = [&](double v) { return (v / denom) * 1.8 + 0.1; };
  auto enhance_inc = [&](double v) {
    const double f = 1.0 + sgn((v / denom) * .9);
    return f > 0.1 ? f : 0.1;  // max(0.1, f)
  };
  auto solarize_arg = [&](double v) {
    const long t = (long)((v / denom) * 256);
    return t < 256 ? t : 256L;
  };
  uint8_t lut[256];
  switch (op) {
    case kRATimmAutoContrast:
      pil_autocontrast(img, (size_t)h * w);
      return 0;
    case kRATimmEqualize:
      pil_equalize(img, (size_t)h * w);
      return 0;
    case kRATimmInvert:
      for (size_t i = 0; i < nbytes; ++i) img[i] = (uint8_t)(255 - img[i]);
      return 0;
    case kRATimmRotate:
      pil_rotate_filtered(img, h, w, sgn((level / denom) * 30.), bicubic, fill, scratch);
      return 0;
    case kRATimmPosterize:
    case kRATimmPosterizeIncreasing: {
      long bits = (long)((level / denom) * 4);
      if (op == kRATimmPosterizeIncreasing) bits = 4 - bits;
      if (bits >= 8) return 0;
      // ImageOps.posterize: i & ~(2 ** (8 - bits) - 1); bits <= 0 clears every bit
      const int keep = bits <= 0 ? 0 : (int)bits;
      const uint8_t mask = (uint8_t)~((1 << (8 - keep)) - 1);
      for (int i = 0; i < 256; ++i) lut[i] = (uint8_t)(i & mask);
      lut_all(img, nbytes, lut);
      return 0;
    }
    case kRATimmSolarize:
    case kRATimmSolarizeIncreasing: {
      long t = solarize_arg(level);
      if (op == kRATimmSolarizeIncreasing) t = 256 - t;
      for (int i = 0; i < 256; ++i) lut[i] = i < t ? (uint8_t)i : (uint8_t)(255 - i);
      lut_all(img, nbytes, lut);
      return 0;
    }
    case kRATimmSolarizeAdd: {
      long add = (long)((level / denom) * 110);
      if (add > 128) add = 128;
      for (int i = 0; i < 256; ++i) lut[i] = i < 128 ? (uint8_t)(i + add > 255 ? 255 : i + add) : (uint8_t)i;
      lut_all(img, nbytes, lut);
      return 0;
    }
    case kRATimmColor: pil_enhance(img, h, w, 1, enhance(level), scratch); return 0;
    case kRATimmColorIncreasing: pil_enhance(img, h, w, 1, enhance_inc(level), scratch); return 0;
    case kRATimmContrast: pil_enhance(img, h, w, 2, enhance(level), scratch); return 0;
    case kRATimmContrastIncreasing: pil_enhance(img, h, w, 2, enhance_inc(level), scratch); return 0;
    case kRATimmBrightness: pil_enhance(img, h, w, 0, enhance(level), scratch); return 0;
    case kRATimmBrightnessIncreasing: pil_enhance(img, h, w, 0, enhance_inc(level), scratch); return 0;
    case kRATimmSharpness: pil_enhance(img, h, w, 3, enhance(level), scratch); return 0;
    case kRATimmSharpnessIncreasing: pil_enhance(img, h, w, 3, enhance_inc(level), scratch); return 0;
    case kRATimmShearX:
    case kRATimmShearY: {
      const double f = sgn((level / denom) * 0.3);
      const double m[6] = {1, op == kRATimmShearX ? f : 0.0, 0, op == kRATimmShearY ? f : 0.0, 1, 0};
      pil_affine_filtered(img, h, w, m, bicubic, fill, scratch);
      return 0;
    }
    case kRATimmTranslateXRel:
    case kRATimmTranslateYRel: {
      const double pct = sgn((level / denom) * 0.45);  // hparams' translate_pct default
      const double px = pct * (op == kRATimmTranslateXRel ? w : h);
      const double m[6] = {1, 0, op == kRATimmTranslateXRel ? px : 0.0, 0, 1, op == kRATimmTranslateYRel ? px : 0.0};
      pil_affine_filtered(img, h, w, m, bicubic, fill, scratch);
      return 0;
    }
    default:
      return fail("randaugment (timm): op id %d is not a timm op", op);
  }
}

// The stored timm ops of one record: ops (kRANone skipped), levels in vals, draws in mags
// (sign: negation, |mags| == 2: BICUBIC). Validates everything before touching the image.
int ra_timm_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, const float* vals, int n,
                  const uint8_t fill[3], uint8_t* scratch) {
  if (h < 1 || w < 1) return fail("randaugment (timm): image size %dx%d must be positive", h, w);
  for (int i = 0; i < n; ++i) {
    if (ops[i] == kRANone) continue;
    if (ops[i] < kRATimmAutoContrast || ops[i] >= kRANumOps)
      return fail("randaugment (timm): op id %d at slot %d is not a timm op", ops[i], i);
    if (!std::isfinite(vals[i]) || vals[i] < 0.0f || vals[i] > 100.0f)
      return fail("randaugment (timm): level %g at slot %d outside [0, 100]", (double)vals[i], i);
    if (mags[i] == 0 || mags[i] < -2 || mags[i] > 2)
      return fail("randaugment (timm): draw code %d at slot %d is not +-1 or +-2", (int)mags[i], i);
  }
  for (int i = 0; i < n; ++i) {
    if (ops[i] == kRANone) continue;
    if (ra_timm_apply_one(img, h, w, ops[i], (double)vals[i], mags[i] < 0, mags[i] == 2 || mags[i] == -2, fill,
                          scratch) != 0)
      return -1;
  }
  return 0;
}

}  // namespace fl

// Test entry: timm RandAugment in place on one h x w x 3 image (scratch allocated per call).
FL_EXPORT int fl_ra_timm_u8(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, const float* vals,
                            int n, const uint8_t* fill) {
  if (img == nullptr || fill == nullptr || (n > 0 && (ops == nullptr || mags == nullptr || vals == nullptr)))
    return fl::fail("fl_ra_timm_u8: null pointer");
  if (h < 1 || w < 1) return fl::fail("fl_ra_timm_u8: image size %dx%d must be positive", h, w);
  return fl::guard("fl_ra_timm_u8", [&] {
    std::vector<uint8_t> scratch((size_t)h * (size_t)w * 3);
    return fl::ra_timm_apply(img, h, w, ops, mags, vals, n, fill, scratch.data());
  });
}
