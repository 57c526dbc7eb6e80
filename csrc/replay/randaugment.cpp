// RandAugment's 14 ops on an interleaved RGB uint8 image, in place, reproducing torchvision's
// uint8 tensor semantics bit for bit (fastload/replay/reference_ra.py is the oracle).
//
// Exactness notes (why the arithmetic looks the way it does):
// - Magnitude tables: torch.linspace on CPU computes start + step*i for the first half and
//   end - step*(steps-1-i) for the second, each contracted into one FMA (measured on the
//   torch CPU build: 0 mismatches over 20k tables); we use fmaf likewise.
// - Blends: torchvision computes fl(r*x) + fl((1-r)*y) in float32 (the double factors are
//   rounded to float), clamps and truncates. A 256-entry table per operand gives identical
//   products. No FP contraction may happen here: GCC contracts a*b+c into an FMA by default
//   in C++ (even with -std=c++17), which moved grid coordinates across pixel-centre ties;
//   the pragma below turns it off for this file only.
// - Geometric ops: the inverse affine matrix is built in double exactly as
//   _get_inverse_affine_matrix, rounded to float, divided by (w/2, h/2) in float, and every
//   grid coordinate is fl(fl(fl(x*r0) + fl(y*r1)) + r2), the order torch's bmm produces here;
//   grid_sample's nearest then unnormalizes with fma(g+1, size/2, -0.5) (its vectorized
//   kernel is compiled with contraction: measured) and rounds half to even.
// - Contrast's mean is the exact integer sum converted to float / N (torch's float32 sum is
//   exact while the sum stays below 2^24, i.e. up to ~65k pixels at full white).
// - Sharpness' 3x3 blur is round(S/13) for the integer weighted sum S: S/13 is never a tie,
//   and float32 error is far below the 1/26 distance to one.
// - v2 semantics (kRASemanticsV2 in num_bins): transforms.v2 computes grey as r*0.2989
//   followed by two add_(x, alpha) and blends as x.mul(r).add_(y, alpha=1-r); torch's CPU
//   add-with-alpha is one FMA on every element (vector body and tail: measured on all 2^24
//   RGB triples), hence the explicit fmaf calls in the *_v2 code (the pragma below only stops
//   implicit contraction). Sharpness: x + (1-r)*(blur - x) as one FMA, border untouched;
//   AutoContrast: (x - min) / ((max - min) * fl(1/255)); Solarize: threshold
//   fl(255 * linspace(1, 0)[k]).
#pragma GCC optimize("fp-contract=off")
#include "randaugment.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "fl_aug.h"
#include "fl_common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fl {
namespace {

// The op ids of the schema's table (fl_aug.h, generated from fastload/sample/schema.py).
enum RAOp : uint8_t {
  kIdentity = kRAIdentity, kShearX = kRAShearX, kShearY = kRAShearY, kTranslateX = kRATranslateX,
  kTranslateY = kRATranslateY, kRotate = kRARotate, kBrightness = kRABrightness, kColor = kRAColor,
  kContrast = kRAContrast, kSharpness = kRASharpness, kPosterize = kRAPosterize, kSolarize = kRASolarize,
  kAutoContrast = kRAAutoContrast, kEqualize = kRAEqualize, kNumOps = kRANumOps
};

// CPython's math.radians / math.degrees constants (mathmodule.c).
constexpr double kPi = 3.14159265358979323846;
constexpr double kDegToRad = kPi / 180.0;
constexpr double kRadToDeg = 180.0 / kPi;

// torch.linspace(start, end, steps)[idx] in float32, as the CPU kernel computes it.
float linspace_at(float start, float end, int steps, int idx) {
  if (steps == 1) return start;
  const float step = (end - start) / (float)(steps - 1);
  if (idx < steps / 2) return std::fmaf(step, (float)idx, start);
  return std::fmaf(-step, (float)(steps - idx - 1), end);
}

bool has_magnitude(int op) {
  return op != kIdentity && op != kAutoContrast && op != kEqualize;
}

bool is_signed(int op) { return ra_signed(op); }

// The float magnitude torchvision passes to _apply_op (float32 table value, then double).
double magnitude(int op, int bin, int num_bins, int h, int w, bool v2) {
  const int k = bin < 0 ? -bin : bin;
  float v = 0.f;
  switch (op) {
    case kShearX: case kShearY: v = linspace_at(0.f, 0.3f, num_bins, k); break;
    case kTranslateX: v = linspace_at(0.f, (float)(150.0 / 331.0 * (double)w), num_bins, k); break;
    case kTranslateY: v = linspace_at(0.f, (float)(150.0 / 331.0 * (double)h), num_bins, k); break;
    case kRotate: v = linspace_at(0.f, 30.f, num_bins, k); break;
    case kBrightness: case kColor: case kContrast: case kSharpness:
      v = linspace_at(0.f, 0.9f, num_bins, k);
      break;
    case kPosterize: {
      // 8 - (arange(n) / ((n - 1) / 4)).round().int(): float32 division, half-to-even.
      const float q = (float)k / (float)((double)(num_bins - 1) / 4.0);
      v = (float)(8 - (int)std::nearbyint(q));
      break;
    }
    case kSolarize:
      // v2 scales a fraction by 255 in double, compared in float32 like v1's table value
      v = v2 ? (float)(255.0 * (double)linspace_at(1.f, 0.f, num_bins, k)) : linspace_at(255.f, 0.f, num_bins, k);
      break;
    default: return 0.0;
  }
  double m = (double)v;
  if (is_signed(op) && bin < 0) m = -m;
  return m;
}

inline uint8_t clamp_trunc(float v) {
  // .clamp(0, 255).to(uint8): truncation toward zero of a value in [0, 255].
  if (!(v > 0.f)) return 0;
  if (v >= 255.f) return 255;
  return (uint8_t)(int)v;
}

// Tables of fl(ratio * i) and fl((1 - ratio) * i), i in 0..255, as torchvision's _blend.
struct Blend {
  float a[256], b[256];
  float ra, rb;
  explicit Blend(double ratio) {
    ra = (float)ratio;
    rb = (float)(1.0 - ratio);
    for (int i = 0; i < 256; ++i) {
      a[i] = ra * (float)i;
      b[i] = rb * (float)i;
    }
  }
};

// torchvision's rgb_to_grayscale: float32 weighted sum, truncated to uint8.
inline uint8_t gray(const uint8_t* p) {
  const float v = (0.2989f * (float)p[0] + 0.587f * (float)p[1]) + 0.114f * (float)p[2];
  return (uint8_t)(int)v;
}

// Inverse affine matrix of torchvision's _get_inverse_affine_matrix (scale 1), in double.
void inverse_affine(double cx, double cy, double angle, double tx, double ty, double shx,
                    double shy, double m[6]) {
  const double rot = angle * kDegToRad;
  const double sx = shx * kDegToRad, sy = shy * kDegToRad;
  const double a = std::cos(rot - sy) / std::cos(sy);
  const double b = -std::cos(rot - sy) * std::tan(sx) / std::cos(sy) - std::sin(rot);
  const double c = std::sin(rot - sy) / std::cos(sy);
  const double d = -std::sin(rot - sy) * std::tan(sx) / std::cos(sy) + std::cos(rot);
  m[0] = d; m[1] = -b; m[2] = 0.0;
  m[3] = -c; m[4] = a; m[5] = 0.0;
  m[2] = m[2] + (m[0] * (-cx - tx) + m[1] * (-cy - ty));
  m[5] = m[5] + (m[3] * (-cx - tx) + m[4] * (-cy - ty));
  m[2] = m[2] + cx;
  m[5] = m[5] + cy;
}

// Nearest-neighbour resampling with zeros outside (torch grid_sample, align_corners=False).
void warp_nearest(uint8_t* img, int h, int w, const double m[6], uint8_t* scratch) {
  const size_t n = (size_t)h * w * 3;
  std::memcpy(scratch, img, n);
  float th[6];
  for (int i = 0; i < 6; ++i) th[i] = (float)m[i];
  const float hw = 0.5f * (float)w, hh = 0.5f * (float)h;
  // rescaled theta^T: column 0 -> x, column 1 -> y
  const float r00 = th[0] / hw, r10 = th[1] / hw, r20 = th[2] / hw;
  const float r01 = th[3] / hh, r11 = th[4] / hh, r21 = th[5] / hh;
  const float sfx = (float)w / 2.f, sfy = (float)h / 2.f;
  const float x0 = -(float)w * 0.5f + 0.5f, y0 = -(float)h * 0.5f + 0.5f;
  for (int i = 0; i < h; ++i) {
    const float by = y0 + (float)i;  // exact: half-integers
    const float py0 = by * r10, py1 = by * r11;
    uint8_t* dst = img + (size_t)i * w * 3;
    int j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    // 8 pixels at a time with the very same float operations (explicit mul/add, one FMA,
    // round-to-nearest-even), then a masked 4-byte gather per pixel. The gather reads one
    // byte past a pixel: a group touching the last pixel of the image goes scalar instead.
    {
      const __m256 vx0 = _mm256_set1_ps(x0), vr00 = _mm256_set1_ps(r00), vr01 = _mm256_set1_ps(r01);
      const __m256 vpy0 = _mm256_set1_ps(py0), vpy1 = _mm256_set1_ps(py1);
      const __m256 vr20 = _mm256_set1_ps(r20), vr21 = _mm256_set1_ps(r21);
      const __m256 one = _mm256_set1_ps(1.f), mhalf = _mm256_set1_ps(-0.5f);
      const __m256 vsfx = _mm256_set1_ps(sfx), vsfy = _mm256_set1_ps(sfy);
      const __m256 zero = _mm256_setzero_ps(), fw = _mm256_set1_ps((float)w), fh = _mm256_set1_ps((float)h);
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i vw = _mm256_set1_epi32(w), last = _mm256_set1_epi32(h * w - 1);
      const __m256i three = _mm256_set1_epi32(3);
      const __m256i pack = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                                            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
      for (; j + 8 <= w; j += 8) {
        const __m256 jf = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_set1_epi32(j), lanes));
        const __m256 bx = _mm256_add_ps(vx0, jf);
        const __m256 gx = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(bx, vr00), vpy0), vr20);
        const __m256 gy = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(bx, vr01), vpy1), vr21);
        const __m256 ix = _mm256_round_ps(_mm256_fmadd_ps(_mm256_add_ps(gx, one), vsfx, mhalf),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 iy = _mm256_round_ps(_mm256_fmadd_ps(_mm256_add_ps(gy, one), vsfy, mhalf),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 inb = _mm256_and_ps(
            _mm256_and_ps(_mm256_cmp_ps(ix, zero, _CMP_GE_OQ), _mm256_cmp_ps(ix, fw, _CMP_LT_OQ)),
            _mm256_and_ps(_mm256_cmp_ps(iy, zero, _CMP_GE_OQ), _mm256_cmp_ps(iy, fh, _CMP_LT_OQ)));
        const __m256i m = _mm256_castps_si256(inb);
        const __m256i idx = _mm256_and_si256(
            m, _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(iy), vw), _mm256_cvttps_epi32(ix)));
        if (!_mm256_testz_si256(m, _mm256_cmpeq_epi32(idx, last))) break;  // rest of the row: scalar
        const __m256i px = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)scratch,
                                                       _mm256_mullo_epi32(idx, three), m, 1);
        const __m256i pk = _mm256_shuffle_epi8(px, pack);
        uint8_t* d = dst + (size_t)j * 3;
        const __m128i hi = _mm256_extracti128_si256(pk, 1);
        _mm_storeu_si128((__m128i*)d, _mm256_castsi256_si128(pk));  // bytes 12..15 rewritten below
        _mm_storel_epi64((__m128i*)(d + 12), hi);
        const int tail = _mm_extract_epi32(hi, 2);
        std::memcpy(d + 20, &tail, 4);
      }
    }
#endif
    for (; j < w; ++j) {
      const float bx = x0 + (float)j;
      const float gx = (bx * r00 + py0) + r20;
      const float gy = (bx * r01 + py1) + r21;
      // torch's vectorized grid_sample computes (g + 1) * size/2 - 0.5 as one FMA
      const float ix = std::nearbyint(std::fmaf(gx + 1.f, sfx, -0.5f));
      const float iy = std::nearbyint(std::fmaf(gy + 1.f, sfy, -0.5f));
      uint8_t* d = dst + (size_t)j * 3;
      if (ix >= 0.f && ix < (float)w && iy >= 0.f && iy < (float)h) {
        const uint8_t* s = scratch + ((size_t)(int)iy * w + (size_t)(int)ix) * 3;
        d[0] = s[0]; d[1] = s[1]; d[2] = s[2];
      } else {
        d[0] = d[1] = d[2] = 0;
      }
    }
  }
}

void apply_lut(uint8_t* img, size_t npix, const uint8_t lut[3][256]) {
  for (size_t p = 0; p < npix; ++p) {
    uint8_t* q = img + p * 3;
    q[0] = lut[0][q[0]];
    q[1] = lut[1][q[1]];
    q[2] = lut[2][q[2]];
  }
}

void autocontrast(uint8_t* img, size_t npix) {
  int lo[3] = {255, 255, 255}, hi[3] = {0, 0, 0};
  for (size_t p = 0; p < npix; ++p)
    for (int c = 0; c < 3; ++c) {
      const int v = img[p * 3 + c];
      lo[c] = v < lo[c] ? v : lo[c];
      hi[c] = v > hi[c] ? v : hi[c];
    }
  uint8_t lut[3][256];
  for (int c = 0; c < 3; ++c) {
    float mn = (float)lo[c], scale;
    if (hi[c] == lo[c]) {  // 255 / 0 is not finite: torchvision keeps the channel
      mn = 0.f;
      scale = 1.f;
    } else {
      // `255 / t` on a tensor is t.reciprocal() * 255 in torch: two roundings
      scale = (1.f / ((float)hi[c] - (float)lo[c])) * 255.f;
    }
    for (int i = 0; i < 256; ++i) lut[c][i] = clamp_trunc(((float)i - mn) * scale);
  }
  apply_lut(img, npix, lut);
}

void equalize(uint8_t* img, size_t npix) {
  int64_t hist[3][256];
  std::memset(hist, 0, sizeof(hist));
  for (size_t p = 0; p < npix; ++p)
    for (int c = 0; c < 3; ++c) hist[c][img[p * 3 + c]]++;
  uint8_t lut[3][256];
  for (int c = 0; c < 3; ++c) {
    // step = (sum of the non-zero bins but the last one) // 255
    int last = 255;
    while (last > 0 && hist[c][last] == 0) --last;
    const int64_t step = ((int64_t)npix - hist[c][last]) / 255;
    if (step == 0) {
      for (int i = 0; i < 256; ++i) lut[c][i] = (uint8_t)i;
      continue;
    }
    // lut[i] = (cumsum[i-1] + step // 2) // step, lut[0] = 0, clamped to 255
    int64_t cum = 0;
    lut[c][0] = 0;
    for (int i = 1; i < 256; ++i) {
      cum += hist[c][i - 1];
      const int64_t v = (cum + step / 2) / step;
      lut[c][i] = (uint8_t)(v > 255 ? 255 : v);
    }
  }
  apply_lut(img, npix, lut);
}

void sharpness(uint8_t* img, int h, int w, double factor, uint8_t* scratch) {
  if (h <= 2 || w <= 2) return;
  const size_t row = (size_t)w * 3;
  std::memcpy(scratch, img, (size_t)h * row);
  const Blend bl(factor);
  // Border pixels blend with themselves (the degenerate image keeps them), which is not
  // always the identity after float rounding and truncation.
  uint8_t self[256];
  for (int i = 0; i < 256; ++i) self[i] = clamp_trunc(bl.a[i] + bl.b[i]);
  for (int i = 0; i < h; ++i) {
    uint8_t* dst = img + (size_t)i * row;
    if (i == 0 || i == h - 1) {
      for (size_t k = 0; k < row; ++k) dst[k] = self[dst[k]];
      continue;
    }
    const uint8_t* up = scratch + (size_t)(i - 1) * row;
    const uint8_t* mid = up + row;
    const uint8_t* dn = mid + row;
    for (int c = 0; c < 3; ++c) {
      dst[c] = self[dst[c]];
      dst[row - 3 + c] = self[dst[row - 3 + c]];
    }
    int j = 1;
#if defined(__AVX2__)
    // 16 interior bytes at a time: the same integer sum and blur, and the blend as the two
    // float products the tables hold (fl(r * i)) plus one add, clamped and truncated.
    {
      const __m256 vra = _mm256_set1_ps(bl.ra), vrb = _mm256_set1_ps(bl.rb);
      const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.f);
      const __m256i five = _mm256_set1_epi16(5), c13 = _mm256_set1_epi16(13);
      const __m256i magic = _mm256_set1_epi16(10083);  // (x * 10083) >> 18 == x / 26 for x <= 6643
      auto ld = [](const uint8_t* q) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q)); };
      auto blend8 = [&](__m128i mid16, __m128i blur16) {
        const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(mid16)), vra);
        const __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(blur16)), vrb);
        const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(a, b), zero), top);
        return _mm256_cvttps_epi32(v);
      };
      size_t k = 3;
      for (; k + 16 + 3 <= row; k += 16) {
        const __m256i m16 = ld(mid + k);
        __m256i S = _mm256_add_epi16(_mm256_add_epi16(ld(up + k - 3), ld(up + k)), ld(up + k + 3));
        S = _mm256_add_epi16(S, _mm256_add_epi16(ld(mid + k - 3), ld(mid + k + 3)));
        S = _mm256_add_epi16(S, _mm256_add_epi16(_mm256_add_epi16(ld(dn + k - 3), ld(dn + k)), ld(dn + k + 3)));
        S = _mm256_add_epi16(S, _mm256_mullo_epi16(m16, five));
        const __m256i x = _mm256_add_epi16(_mm256_add_epi16(S, S), c13);
        const __m256i blur = _mm256_srli_epi16(_mm256_mulhi_epu16(x, magic), 2);
        const __m256i i0 = blend8(_mm256_castsi256_si128(m16), _mm256_castsi256_si128(blur));
        const __m256i i1 = blend8(_mm256_extracti128_si256(m16, 1), _mm256_extracti128_si256(blur, 1));
        const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(i0, i1), 0xD8);
        const __m128i p8 = _mm_packus_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
        _mm_storeu_si128((__m128i*)(dst + k), p8);
      }
      j = (int)(k / 3);  // k is a multiple of 3 only when 16 * steps is: finish the pixel below
      for (size_t q = k; q < (size_t)(j + 1) * 3 && j < w - 1; ++q) {
        const size_t l = q - 3, m = q, r = q + 3;
        const int s2 = up[l] + up[m] + up[r] + mid[l] + 5 * mid[m] + mid[r] + dn[l] + dn[m] + dn[r];
        dst[m] = clamp_trunc(bl.a[mid[m]] + bl.b[(2 * s2 + 13) / 26]);
      }
      if (k % 3 != 0) ++j;
    }
#endif
    for (; j < w - 1; ++j) {
      for (int c = 0; c < 3; ++c) {
        const size_t l = (size_t)(j - 1) * 3 + c, m = (size_t)j * 3 + c, r = (size_t)(j + 1) * 3 + c;
        const int s = up[l] + up[m] + up[r] + mid[l] + 5 * mid[m] + mid[r] + dn[l] + dn[m] + dn[r];
        const int blur = (2 * s + 13) / 26;  // round(s / 13), never a tie
        dst[m] = clamp_trunc(bl.a[mid[m]] + bl.b[blur]);
      }
    }
  }
}

// v2's float grey level (floored, kept in float).
inline float gray_v2(const uint8_t* p) {
  return std::floor(std::fmaf((float)p[2], 0.114f, std::fmaf((float)p[1], 0.587f, (float)p[0] * 0.2989f)));
}

void contrast_v2(uint8_t* img, size_t npix, double factor) {
  int64_t sum = 0;  // floored grey levels are integers: the float32 sum is exact below 2^24
  for (size_t p = 0; p < npix; ++p) sum += (int64_t)gray_v2(img + p * 3);
  const float mean = (float)sum / (float)npix;
  const Blend bl(factor);
  uint8_t lut[3][256];
  for (int i = 0; i < 256; ++i) lut[0][i] = lut[1][i] = lut[2][i] = clamp_trunc(std::fmaf(mean, bl.rb, bl.a[i]));
  apply_lut(img, npix, lut);
}

void sharpness_v2(uint8_t* img, int h, int w, double factor, uint8_t* scratch) {
  if (h <= 2 || w <= 2) return;
  const size_t row = (size_t)w * 3;
  std::memcpy(scratch, img, (size_t)h * row);
  const float rb = (float)(1.0 - factor);
  for (int i = 1; i < h - 1; ++i) {
    uint8_t* dst = img + (size_t)i * row;
    const uint8_t* up = scratch + (size_t)(i - 1) * row;
    const uint8_t* mid = up + row;
    const uint8_t* dn = mid + row;
    for (size_t m = 3; m + 3 < row; ++m) {
      const size_t l = m - 3, r = m + 3;
      const int s = up[l] + up[m] + up[r] + mid[l] + 5 * mid[m] + mid[r] + dn[l] + dn[m] + dn[r];
      const int blur = (2 * s + 13) / 26;
      dst[m] = clamp_trunc(std::fmaf((float)(blur - mid[m]), rb, (float)mid[m]));
    }
  }
}

void autocontrast_v2(uint8_t* img, size_t npix) {
  int lo[3] = {255, 255, 255}, hi[3] = {0, 0, 0};
  for (size_t p = 0; p < npix; ++p)
    for (int c = 0; c < 3; ++c) {
      const int v = img[p * 3 + c];
      lo[c] = v < lo[c] ? v : lo[c];
      hi[c] = v > hi[c] ? v : hi[c];
    }
  uint8_t lut[3][256];
  for (int c = 0; c < 3; ++c) {
    float mn = (float)lo[c], inv = ((float)hi[c] - (float)lo[c]) * (float)(1.0 / 255.0);
    if (hi[c] == lo[c]) {
      mn = 0.f;
      inv = 1.f;
    }
    for (int i = 0; i < 256; ++i) lut[c][i] = clamp_trunc(((float)i - mn) / inv);
  }
  apply_lut(img, npix, lut);
}

int apply_one(uint8_t* img, int h, int w, int op, double mag, uint8_t* scratch, bool v2) {
  const size_t npix = (size_t)h * w;
  if (v2) {
    switch (op) {
      case kContrast: contrast_v2(img, npix, 1.0 + mag); return 0;
      case kSharpness: sharpness_v2(img, h, w, 1.0 + mag, scratch); return 0;
      case kAutoContrast: autocontrast_v2(img, npix); return 0;
      default: break;  // Color below; Brightness (x * r == v1's blend with zeros) and the rest: shared
    }
  }
  double mat[6];
  switch (op) {
    case kIdentity:
      return 0;
    case kShearX:
    case kShearY: {
      const double deg = std::atan(mag) * kRadToDeg;
      // torchvision shears about pixel (0, 0): centre (-w/2, -h/2) from the image centre
      inverse_affine(0.0 - w * 0.5, 0.0 - h * 0.5, 0.0, 0.0, 0.0, op == kShearX ? deg : 0.0,
                     op == kShearY ? deg : 0.0, mat);
      warp_nearest(img, h, w, mat, scratch);
      return 0;
    }
    case kTranslateX:
    case kTranslateY: {
      const double t = (double)(long)mag;  // Python int(): toward zero
      if (t == 0.0) return 0;  // identity grid samples every pixel onto itself
      inverse_affine(0.0, 0.0, 0.0, op == kTranslateX ? t : 0.0, op == kTranslateY ? t : 0.0,
                     0.0, 0.0, mat);
      warp_nearest(img, h, w, mat, scratch);
      return 0;
    }
    case kRotate:
      inverse_affine(0.0, 0.0, -mag, 0.0, 0.0, 0.0, 0.0, mat);
      warp_nearest(img, h, w, mat, scratch);
      return 0;
    case kBrightness: {
      const Blend bl(1.0 + mag);
      uint8_t lut[3][256];
      for (int i = 0; i < 256; ++i) lut[0][i] = lut[1][i] = lut[2][i] = clamp_trunc(bl.a[i] + bl.b[0]);
      apply_lut(img, npix, lut);
      return 0;
    }
    case kColor: {
      const Blend bl(1.0 + mag);
      size_t p = 0;
#if defined(__AVX2__)
      // 16 pixels at a time: de-interleave, the same float products / sums as gray() and the
      // tables (v2: the same FMAs as gray_v2), clamp + truncate, re-interleave.
#if defined(__FMA__)
      if (true) {
#else
      if (!v2) {  // no FMA instructions: v2 takes the scalar loop (std::fmaf)
#endif
        alignas(16) int8_t split[3][3][16], join[3][3][16];
        for (int c = 0; c < 3; ++c)
          for (int o = 0; o < 3; ++o)
            for (int i = 0; i < 16; ++i) {
              const int k = 3 * i + c;
              split[c][o][i] = (k / 16 == o) ? (int8_t)(k % 16) : (int8_t)-128;
              const int k2 = 16 * c + i;  // here c is the output block, o the channel
              join[c][o][i] = (k2 % 3 == o) ? (int8_t)(k2 / 3) : (int8_t)-128;
            }
        const __m256 wr = _mm256_set1_ps(0.2989f), wg = _mm256_set1_ps(0.587f), wb = _mm256_set1_ps(0.114f);
        const __m256 vra = _mm256_set1_ps(bl.ra), vrb = _mm256_set1_ps(bl.rb);
        const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.f);
        auto f8 = [](__m128i b8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8)); };
        for (; p + 16 <= npix; p += 16) {
          uint8_t* q = img + p * 3;
          const __m128i in[3] = {_mm_loadu_si128((const __m128i*)q), _mm_loadu_si128((const __m128i*)(q + 16)),
                                 _mm_loadu_si128((const __m128i*)(q + 32))};
          __m128i ch[3];
          for (int c = 0; c < 3; ++c) {
            __m128i v = _mm_shuffle_epi8(in[0], _mm_load_si128((const __m128i*)split[c][0]));
            v = _mm_or_si128(v, _mm_shuffle_epi8(in[1], _mm_load_si128((const __m128i*)split[c][1])));
            ch[c] = _mm_or_si128(v, _mm_shuffle_epi8(in[2], _mm_load_si128((const __m128i*)split[c][2])));
          }
          __m256i res[3][2];
          for (int hh = 0; hh < 2; ++hh) {
            __m128i part[3];
            for (int c = 0; c < 3; ++c) part[c] = hh ? _mm_srli_si128(ch[c], 8) : ch[c];
            const __m256 r = f8(part[0]), g = f8(part[1]), b = f8(part[2]);
            const __m256 cf[3] = {r, g, b};
#if defined(__FMA__)
            if (v2) {  // the same FMAs as gray_v2 and the scalar loop below
              const __m256 gr = _mm256_floor_ps(
                  _mm256_fmadd_ps(b, wb, _mm256_fmadd_ps(g, wg, _mm256_mul_ps(r, wr))));
              for (int c = 0; c < 3; ++c) {
                const __m256 v = _mm256_fmadd_ps(gr, vrb, _mm256_mul_ps(cf[c], vra));
                res[c][hh] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), top));
              }
              continue;
            }
#endif
            const __m256 gr = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(wr, r), _mm256_mul_ps(wg, g)),
                                            _mm256_mul_ps(wb, b));
            const __m256 gb = _mm256_mul_ps(vrb, _mm256_cvtepi32_ps(_mm256_cvttps_epi32(gr)));
            for (int c = 0; c < 3; ++c) {
              const __m256 v = _mm256_add_ps(_mm256_mul_ps(vra, cf[c]), gb);
              res[c][hh] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), top));
            }
          }
          __m128i outc[3];
          for (int c = 0; c < 3; ++c) {
            const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(res[c][0], res[c][1]), 0xD8);
            outc[c] = _mm_packus_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
          }
          for (int o = 0; o < 3; ++o) {
            __m128i v = _mm_shuffle_epi8(outc[0], _mm_load_si128((const __m128i*)join[o][0]));
            v = _mm_or_si128(v, _mm_shuffle_epi8(outc[1], _mm_load_si128((const __m128i*)join[o][1])));
            v = _mm_or_si128(v, _mm_shuffle_epi8(outc[2], _mm_load_si128((const __m128i*)join[o][2])));
            _mm_storeu_si128((__m128i*)(q + 16 * o), v);
          }
        }
      }
#endif
      for (; p < npix && v2; ++p) {
        uint8_t* q = img + p * 3;
        const float g = gray_v2(q);
        for (int c = 0; c < 3; ++c) q[c] = clamp_trunc(std::fmaf(g, bl.rb, bl.a[q[c]]));
      }
      for (; p < npix; ++p) {
        uint8_t* q = img + p * 3;
        const float g = bl.b[gray(q)];
        q[0] = clamp_trunc(bl.a[q[0]] + g);
        q[1] = clamp_trunc(bl.a[q[1]] + g);
        q[2] = clamp_trunc(bl.a[q[2]] + g);
      }
      return 0;
    }
    case kContrast: {
      int64_t sum = 0;
      for (size_t p = 0; p < npix; ++p) sum += gray(img + p * 3);
      const float mean = (float)sum / (float)npix;
      const Blend bl(1.0 + mag);
      const float off = bl.rb * mean;
      uint8_t lut[3][256];
      for (int i = 0; i < 256; ++i) lut[0][i] = lut[1][i] = lut[2][i] = clamp_trunc(bl.a[i] + off);
      apply_lut(img, npix, lut);
      return 0;
    }
    case kSharpness:
      sharpness(img, h, w, 1.0 + mag, scratch);
      return 0;
    case kPosterize: {
      const int bits = (int)mag;
      if (bits < 0 || bits > 8) return fail("randaugment: posterize bits %d outside [0, 8]", bits);
      const uint8_t mask = (uint8_t)(0xFF << (8 - bits));
      uint8_t lut[3][256];
      for (int i = 0; i < 256; ++i) lut[0][i] = lut[1][i] = lut[2][i] = (uint8_t)(i & mask);
      apply_lut(img, npix, lut);
      return 0;
    }
    case kSolarize: {
      const float thr = (float)mag;
      uint8_t lut[3][256];
      for (int i = 0; i < 256; ++i)
        lut[0][i] = lut[1][i] = lut[2][i] = (float)i >= thr ? (uint8_t)(255 - i) : (uint8_t)i;
      apply_lut(img, npix, lut);
      return 0;
    }
    case kAutoContrast:
      autocontrast(img, npix);
      return 0;
    case kEqualize:
      equalize(img, npix);
      return 0;
    default:
      return fail("randaugment: unknown op id %d", op);
  }
}

}  // namespace

int randaugment_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, int n,
                      int num_bins, uint8_t* scratch) {
  if (h < 1 || w < 1) return fail("randaugment: image size %dx%d must be positive", h, w);
  const bool v2 = (num_bins & kRASemanticsV2) != 0;
  const bool pil = (num_bins & kRASemanticsPIL) != 0;
  if (v2 && pil) return fail("randaugment: num_bins carries both the v2 and the pil semantics bits");
  num_bins &= ~kRASemanticsMask;
  if (num_bins < 2 || num_bins > 128) return fail("randaugment: num_bins %d outside [2, 128]", num_bins);
  if (n < 0) return fail("randaugment: negative op count %d", n);
  // Validate everything first so that a bad record leaves the image untouched.
  for (int i = 0; i < n; ++i) {
    const int op = ops[i];
    if (op == kRANone) continue;
    if (op >= kNumOps) return fail("randaugment: unknown op id %d at slot %d", op, i);
    const int k = mags[i] < 0 ? -(int)mags[i] : (int)mags[i];
    if (has_magnitude(op) && k >= num_bins)
      return fail("randaugment: magnitude bin %d of op %d outside [-%d, %d]", (int)mags[i], op,
                  num_bins - 1, num_bins - 1);
  }
  for (int i = 0; i < n; ++i) {
    const int op = ops[i];
    if (op == kRANone) continue;
    const double mag = magnitude(op, mags[i], num_bins, h, w, v2);  // pil: v1's tables
    if ((pil ? ra_pil_apply_one(img, h, w, op, mag, scratch) : apply_one(img, h, w, op, mag, scratch, v2)) != 0)
      return -1;
  }
  return 0;
}

// ml-dr records store float magnitudes (the value _apply_op receives); translations were
// sampled on a grid_h x grid_w image and scale to this one.
int randaugment_apply_values(uint8_t* img, int h, int w, const uint8_t* ops, const float* vals, int n,
                             int grid_h, int grid_w, uint8_t* scratch, int semantics) {
  if (h < 1 || w < 1) return fail("randaugment: image size %dx%d must be positive", h, w);
  const bool v2 = (semantics & kRASemanticsV2) != 0, pil = (semantics & kRASemanticsPIL) != 0;
  if (v2 && pil) return fail("randaugment: both the v2 and the pil semantics bits");
  if (n < 0) return fail("randaugment: negative op count %d", n);
  for (int i = 0; i < n; ++i) {
    if (ops[i] != kRANone && ops[i] >= kNumOps) return fail("randaugment: unknown op id %d at slot %d", ops[i], i);
    if (ops[i] != kRANone && !std::isfinite(vals[i])) return fail("randaugment: non-finite magnitude at slot %d", i);
  }
  for (int i = 0; i < n; ++i) {
    const int op = ops[i];
    if (op == kRANone) continue;
    double mag = (double)vals[i];
    if (op == kTranslateX && grid_w > 0) mag = mag * w / grid_w;
    if (op == kTranslateY && grid_h > 0) mag = mag * h / grid_h;
    if ((pil ? ra_pil_apply_one(img, h, w, op, mag, scratch) : apply_one(img, h, w, op, mag, scratch, v2)) != 0)
      return -1;
  }
  return 0;
}

}  // namespace fl

// Test entry: RandAugment in place on one h x w x 3 image (scratch allocated per call).
FL_EXPORT int fl_randaugment_u8(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags,
                                int n, int num_bins) {
  if (img == nullptr || (n > 0 && (ops == nullptr || mags == nullptr)))
    return fl::fail("fl_randaugment_u8: null pointer");
  if (h < 1 || w < 1) return fl::fail("fl_randaugment_u8: image size %dx%d must be positive", h, w);
  return fl::guard("fl_randaugment_u8", [&] {
    std::vector<uint8_t> scratch((size_t)h * (size_t)w * 3);
    return fl::randaugment_apply(img, h, w, ops, mags, n, num_bins, scratch.data());
  });
}
