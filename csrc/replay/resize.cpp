// Separable antialiased resize matching torch's F.interpolate(antialias=True,
// align_corners=False) for bilinear and bicubic (the filters of PIL, which torchvision uses),
// fused with crop and horizontal flip. Weights are computed once per sample and axis into
// per-thread scratch; the passes allocate nothing.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>

#include "fl_common.h"
#include "replay_impl.h"

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

namespace fl {
#if defined(__SSE4_1__)
static inline __m128 madd(__m128 a, __m128 b, __m128 c) {
#if defined(__FMA__)
  return _mm_fmadd_ps(a, b, c);
#else
  return _mm_add_ps(_mm_mul_ps(a, b), c);
#endif
}
#endif
}  // namespace fl

namespace fl {

static inline double filter_bilinear(double x) {
  x = x < 0 ? -x : x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

static inline double filter_bicubic(double x) {
  // Keys cubic with a = -0.5: torch uses it for antialias=True (PIL compatibility).
  const double a = -0.5;
  x = x < 0 ? -x : x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

namespace {
struct AxisGeom {
  int out, lo, hi, K;
  double x0, scale, support, invscale;
};
}  // namespace

// Taps and normalized weights of output i (the reference rule; the SIMD path below must
// reproduce it bit for bit): wp[0, K) = nn weights then zeros.
static void axis_output(const AxisGeom& G, bool bicubic, int i, float* wp, int* start, int* count) {
  double center = G.x0 + G.scale * (i + 0.5);
  // torch truncates toward zero then clamps at 0; with the clamp at lo the two agree.
  int xmin = std::max((int)std::floor(center - G.support + 0.5), G.lo);
  int xmax = std::min((int)std::floor(center + G.support + 0.5), G.hi);
  if (xmax <= xmin) {  // degenerate (never for a valid box): nearest pixel
    xmin = std::min(std::max((int)std::floor(center), G.lo), G.hi - 1);
    xmax = xmin + 1;
  }
  const int K = G.K, nn = std::min(xmax - xmin, K);
  double total = 0.0;
  for (int j = 0; j < nn; ++j) {
    double wv = bicubic ? filter_bicubic((j + xmin - center + 0.5) * G.invscale)
                        : filter_bilinear((j + xmin - center + 0.5) * G.invscale);
    wp[j] = (float)wv;
    total += wv;
  }
  const double inv = total != 0.0 ? 1.0 / total : 0.0;
  for (int j = 0; j < K; ++j) wp[j] = j < nn ? (float)(wp[j] * inv) : 0.0f;
  *start = xmin;
  *count = nn;
}

#if defined(__AVX2__) && defined(__FMA__)
// Four outputs per step, one per double lane, with the exact operations of axis_output
// (the build contracts a * b + c into fma: so do these, explicitly, where it does). Taps
// j >= nn get weight +0.0, which leaves the running total unchanged (it is never -0.0).
constexpr int kVecMaxK = 64;

template <bool BIC>
static inline __m256d filter4(__m256d x) {
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d ax = _mm256_andnot_pd(_mm256_set1_pd(-0.0), x);
  if (!BIC) {
    return _mm256_and_pd(_mm256_cmp_pd(ax, one, _CMP_LT_OQ), _mm256_sub_pd(one, ax));
  } else {
    const __m256d t = _mm256_mul_pd(ax, _mm256_fmadd_pd(ax, _mm256_set1_pd(1.5), _mm256_set1_pd(-2.5)));
    const __m256d r1 = _mm256_fmadd_pd(ax, t, one);
    const __m256d u = _mm256_fmadd_pd(_mm256_sub_pd(ax, _mm256_set1_pd(5.0)), ax, _mm256_set1_pd(8.0));
    const __m256d r2 = _mm256_mul_pd(_mm256_fmadd_pd(ax, u, _mm256_set1_pd(-4.0)), _mm256_set1_pd(-0.5));
    const __m256d r = _mm256_blendv_pd(r2, r1, _mm256_cmp_pd(ax, one, _CMP_LT_OQ));
    return _mm256_and_pd(_mm256_cmp_pd(ax, _mm256_set1_pd(2.0), _CMP_LT_OQ), r);
  }
}

// Outputs [i, i + 4): returns false (nothing written) when a lane is degenerate.
template <bool BIC>
static bool axis_output4(const AxisGeom& G, int i, float* w, int* start, int* count) {
  const int K = G.K;
  const __m256d half = _mm256_set1_pd(0.5);
  const __m256d ii = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_add_epi32(_mm_set1_epi32(i), _mm_setr_epi32(0, 1, 2, 3))), half);
  const __m256d center = _mm256_fmadd_pd(_mm256_set1_pd(G.scale), ii, _mm256_set1_pd(G.x0));
  const __m256d sup = _mm256_set1_pd(G.support);
  const int rnd = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  __m128i xmin = _mm256_cvttpd_epi32(_mm256_round_pd(_mm256_add_pd(_mm256_sub_pd(center, sup), half), rnd));
  __m128i xmax = _mm256_cvttpd_epi32(_mm256_round_pd(_mm256_add_pd(_mm256_add_pd(center, sup), half), rnd));
  xmin = _mm_max_epi32(xmin, _mm_set1_epi32(G.lo));
  xmax = _mm_min_epi32(xmax, _mm_set1_epi32(G.hi));
  const __m128i span = _mm_sub_epi32(xmax, xmin);
  if (_mm_movemask_epi8(_mm_cmpgt_epi32(span, _mm_setzero_si128())) != 0xFFFF) return false;
  const __m128i nn = _mm_min_epi32(span, _mm_set1_epi32(K));
  const __m256d invscale = _mm256_set1_pd(G.invscale);
  // Taps past the widest lane's count are zero in every lane: skip their evaluation.
  __m128i m4 = _mm_max_epi32(nn, _mm_shuffle_epi32(nn, 0x4E));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xB1));
  const int nmax = _mm_cvtsi128_si32(m4);
  alignas(16) float col[kVecMaxK * 4];
  __m256d total = _mm256_setzero_pd();
  for (int j = 0; j < nmax; ++j) {
    const __m128i jj = _mm_set1_epi32(j);
    const __m256d xj = _mm256_cvtepi32_pd(_mm_add_epi32(jj, xmin));
    const __m256d x = _mm256_mul_pd(_mm256_add_pd(_mm256_sub_pd(xj, center), half), invscale);
    const __m256d keep = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_cmpgt_epi32(nn, jj)));
    const __m256d wv = _mm256_and_pd(keep, filter4<BIC>(x));
    _mm_store_ps(col + 4 * j, _mm256_cvtpd_ps(wv));
    total = _mm256_add_pd(total, wv);
  }
  const __m256d nz = _mm256_cmp_pd(total, _mm256_setzero_pd(), _CMP_NEQ_UQ);
  const __m256d inv = _mm256_and_pd(nz, _mm256_div_pd(_mm256_set1_pd(1.0), total));
  for (int j = 0; j < nmax; ++j) {
    const __m128 keep = _mm_castsi128_ps(_mm_cmpgt_epi32(nn, _mm_set1_epi32(j)));
    const __m128 v = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm_load_ps(col + 4 * j)), inv));
    _mm_store_ps(col + 4 * j, _mm_and_ps(keep, v));
  }
  for (int j = nmax; j < K; ++j) _mm_store_ps(col + 4 * j, _mm_setzero_ps());
  // Transpose the K x 4 columns into the four consecutive rows w[(i + l) * K + j].
  float* d = w + (size_t)i * K;
  int j = 0;
  for (; j + 4 <= K; j += 4) {
    __m128 c0 = _mm_load_ps(col + 4 * j), c1 = _mm_load_ps(col + 4 * j + 4), c2 = _mm_load_ps(col + 4 * j + 8),
           c3 = _mm_load_ps(col + 4 * j + 12);
    _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
    _mm_storeu_ps(d + j, c0);
    _mm_storeu_ps(d + K + j, c1);
    _mm_storeu_ps(d + 2 * K + j, c2);
    _mm_storeu_ps(d + 3 * K + j, c3);
  }
  for (; j < K; ++j)
    for (int l = 0; l < 4; ++l) d[l * K + j] = col[4 * j + l];
  _mm_storeu_si128((__m128i*)(start + i), xmin);
  _mm_storeu_si128((__m128i*)(count + i), nn);
  return true;
}
#endif

#if defined(__AVX2__)
// The int16 tables of outputs [i, i + 8) when kmax <= 8, four outputs per 128-bit lane set
// (rows transposed to tap columns), with the scalar loop's exact integer rule: q =
// (int16_t)lrint(w * kOne) (w * kOne is exact in float, and cvtps2dq rounds as lrint unless
// it overflows int32: then returns false having written nothing); the first largest |q|
// absorbs kOne - sum; pairs packed little-endian. Writes wpair rows i..i+7 (wide: room for
// 4 int32 past each row start) and the wvec group i / 8. Reads 8 floats per row.
static inline bool quantize8(const float* w, int K, int kmax, int KP, int i, int32_t* wpair, int32_t* wvec,
                             bool wide) {
  __m128i P[2][4];
  const __m128 sc = _mm_set1_ps((float)kOne);
  const __m128i ind = _mm_set1_epi32(INT32_MIN);
  for (int h = 0; h < 2; ++h) {
    const float* r = w + (size_t)(i + 4 * h) * K;
    __m128 c[8];
    c[0] = _mm_loadu_ps(r), c[1] = _mm_loadu_ps(r + K), c[2] = _mm_loadu_ps(r + 2 * K), c[3] = _mm_loadu_ps(r + 3 * K);
    _MM_TRANSPOSE4_PS(c[0], c[1], c[2], c[3]);
    if (kmax > 4) {
      c[4] = _mm_loadu_ps(r + 4), c[5] = _mm_loadu_ps(r + K + 4), c[6] = _mm_loadu_ps(r + 2 * K + 4),
      c[7] = _mm_loadu_ps(r + 3 * K + 4);
      _MM_TRANSPOSE4_PS(c[4], c[5], c[6], c[7]);
    }
    __m128i q[8], bad = _mm_setzero_si128(), sum = _mm_setzero_si128(), best = _mm_setzero_si128(),
                  big = _mm_setzero_si128();
    for (int j = 0; j < kmax; ++j) {
      __m128i v = _mm_cvtps_epi32(_mm_mul_ps(c[j], sc));
      bad = _mm_or_si128(bad, _mm_cmpeq_epi32(v, ind));
      v = _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);  // (int16_t) truncation
      q[j] = v;
      sum = _mm_add_epi32(sum, v);
      const __m128i a = _mm_abs_epi32(v);
      if (j == 0) {
        best = a;
      } else {
        big = _mm_blendv_epi8(big, _mm_set1_epi32(j), _mm_cmpgt_epi32(a, best));
        best = _mm_max_epi32(best, a);
      }
    }
    if (!_mm_testz_si128(bad, bad)) return false;
    const __m128i d = _mm_sub_epi32(_mm_set1_epi32(kOne), sum);
    for (int j = 0; j < kmax; ++j) {
      const __m128i v = _mm_add_epi32(q[j], _mm_and_si128(_mm_cmpeq_epi32(big, _mm_set1_epi32(j)), d));
      q[j] = _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);
    }
    if (kmax & 1) q[kmax] = _mm_setzero_si128();
    const __m128i lo16 = _mm_set1_epi32(0xFFFF);
    for (int p = 0; p < 4; ++p)
      P[h][p] = p < KP ? _mm_or_si128(_mm_and_si128(q[2 * p], lo16), _mm_slli_epi32(q[2 * p + 1], 16))
                       : _mm_setzero_si128();
  }
  for (int h = 0; h < 2; ++h) {
    __m128 t0 = _mm_castsi128_ps(P[h][0]), t1 = _mm_castsi128_ps(P[h][1]), t2 = _mm_castsi128_ps(P[h][2]),
           t3 = _mm_castsi128_ps(P[h][3]);
    _MM_TRANSPOSE4_PS(t0, t1, t2, t3);  // t_l = pairs of output i + 4h + l
    const __m128 rows[4] = {t0, t1, t2, t3};
    for (int l = 0; l < 4; ++l) {
      int32_t* dst = wpair + (size_t)(i + 4 * h + l) * KP;
      if (wide)
        _mm_storeu_ps((float*)dst, rows[l]);  // spills into the next row, rewritten next
      else {
        alignas(16) int32_t t[4];
        _mm_store_ps((float*)t, rows[l]);
        for (int p = 0; p < KP; ++p) dst[p] = t[p];
      }
    }
  }
  int32_t* g = wvec + (size_t)(i / 8) * 4 * KP * 8;
  for (int p = 0; p < KP; ++p) {
    const __m128i a = P[0][p], b = P[1][p];
#define FL_WV(J) \
  _mm256_storeu_si256((__m256i*)(g + ((size_t)(J) * KP + p) * 8), \
                      _mm256_set_m128i(_mm_shuffle_epi32(b, (J) * 0x55), _mm_shuffle_epi32(a, (J) * 0x55)));
    FL_WV(0) FL_WV(1) FL_WV(2) FL_WV(3)
#undef FL_WV
  }
  return true;
}
#endif

void compute_axis_weights(int out, double x0, double len, int lo, int hi, bool bicubic, AxisWeights& aw,
                          bool int16) {
  const double interp = bicubic ? 4.0 : 2.0;
  const double scale = len / out;
  const double support = scale >= 1.0 ? interp * 0.5 * scale : interp * 0.5;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  int K = (int)std::ceil(support) * 2 + 1;
  aw.out = out;
  aw.K = K;
  aw.start.resize(out);
  aw.count.resize(out);
  aw.w.resize((size_t)out * K);
  const AxisGeom G{out, lo, hi, K, x0, scale, support, invscale};
  float* w = aw.w.data();
  int* start = aw.start.data();
  int* count = aw.count.data();
  int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (K <= kVecMaxK) {
    for (; i + 4 <= out; i += 4) {
      if (bicubic ? axis_output4<true>(G, i, w, start, count) : axis_output4<false>(G, i, w, start, count))
        continue;
      for (int l = i; l < i + 4; ++l) axis_output(G, bicubic, l, w + (size_t)l * K, start + l, count + l);
    }
  }
#endif
  for (; i < out; ++i) axis_output(G, bicubic, i, w + (size_t)i * K, start + i, count + i);
  int tlo = hi, thi = lo, kmax = 1;
  for (i = 0; i < out; ++i) {
    tlo = std::min(tlo, start[i]);
    thi = std::max(thi, start[i] + count[i]);
    kmax = std::max(kmax, count[i]);
  }
  // Give every output the same tap count (the widest), zero-padded and kept inside [lo, hi):
  // fixed-count inner loops unroll and overlap across outputs.
  if (kmax <= hi - lo) {
    tlo = hi;
    thi = lo;
    for (i = 0; i < out; ++i) {
      const int n = count[i];
      // Rows are already zero past their count: only a start moved left needs a shift.
      const int s0 = start[i], s1 = n < kmax ? std::min(s0, hi - kmax) : s0, sh = s0 - s1;
      if (sh > 0) {
        float* wp = w + (size_t)i * K;
        for (int j = kmax - 1; j >= 0; --j) wp[j] = (j - sh >= 0 && j - sh < n) ? wp[j - sh] : 0.0f;
      }
      start[i] = s1;
      count[i] = kmax;
      tlo = std::min(tlo, s1);
      thi = std::max(thi, s1 + kmax);
    }
    aw.taps = kmax;
    // int16 weight pairs (14 fractional bits) for the horizontal pmaddwd pass; the rounded
    // weights of each output are nudged to sum to exactly 1.0 (no DC gain error). The
    // vertical axis reads only the float weights and skips these tables.
    const int KP = (kmax + 1) / 2;
    aw.KP = int16 ? KP : 0;
    const bool pairs = int16 && kmax <= 16;
    aw.wpair.resize(pairs ? (size_t)out * KP : 0);
#if defined(__AVX2__)
    const int NG = pairs ? out / 8 : 0;
    aw.wvec.resize((size_t)NG * 4 * KP * 8);
#endif
    for (i = 0; i < out && pairs; ++i) {
#if defined(__AVX2__)
      // Groups of 8 (the wvec groups) whose 8-float row reads stay inside w.
      if ((i & 7) == 0 && i + 8 <= out && kmax <= 8 && (size_t)(i + 7) * K + 8 <= (size_t)out * K &&
          quantize8(w, K, kmax, KP, i, aw.wpair.data(), aw.wvec.data(), (size_t)(i + 7) * KP + 4 <= (size_t)out * KP)) {
        i += 7;
        continue;
      }
#endif
      const float* wp = w + (size_t)i * K;
      int32_t* dst = aw.wpair.data() + (size_t)i * KP;
      int16_t q[16] = {0};
      int sum = 0, big = 0;
      for (int j = 0; j < kmax; ++j) {
        q[j] = (int16_t)std::lrint(wp[j] * (double)kOne);
        sum += q[j];
        if (std::abs(q[j]) > std::abs(q[big])) big = j;
      }
      q[big] = (int16_t)(q[big] + (kOne - sum));
      for (int p = 0; p < KP; ++p)
        dst[p] = (int32_t)((uint32_t)(uint16_t)q[2 * p] | ((uint32_t)(uint16_t)q[2 * p + 1] << 16));
#if defined(__AVX2__)
      if (i < 8 * NG) {
        const int g = i / 8, j = i % 8;
        int32_t* d = aw.wvec.data() + ((size_t)g * 4 + (j & 3)) * KP * 8 + (j & 4);
        for (int p = 0; p < KP; ++p)
          for (int k = 0; k < 4; ++k) d[8 * p + k] = dst[p];
      }
#endif
    }
    aw.off3.resize(int16 ? out : 0);
    for (i = 0; i < out && int16; ++i) aw.off3[i] = 3 * start[i];
  } else {
    aw.taps = 0;  // counts differ: generic loops
  }
  aw.tap_lo = tlo;
  aw.tap_hi = thi;
}

#if defined(__SSE4_1__)
// All outputs have 2*TP taps (zero-padded): per tap pair, one 8-byte load, a shuffle to
// int16 (R0 R1 G0 G1 B0 B1 0 0) and one pmaddwd with the packed int16 weights. Exact
// integer sums in units of 1/kOne; reads up to 2 bytes past the last tap's pixel.
template <int TP>
static void row_h_i16(const uint8_t* row, int col_base, const AxisWeights& ax, bool flip, float* dst, int x0,
                      int x1) {
  const int out = ax.out, KP = ax.KP;
  const __m128i shuf = _mm_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
  auto one = [&](int x) {
    const int32_t* wp = &ax.wpair[(size_t)x * KP];
    const uint8_t* s = row + (size_t)(ax.start[x] - col_base) * 3;
    __m128i acc = _mm_madd_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)s), shuf), _mm_set1_epi32(wp[0]));
#pragma GCC unroll 8
    for (int p = 1; p < TP; ++p) {
      __m128i px = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(s + 6 * p)), shuf);
      acc = _mm_add_epi32(acc, _mm_madd_epi16(px, _mm_set1_epi32(wp[p])));
    }
    return _mm_cvtepi32_ps(acc);  // R, G, B, 0
  };
  int x = x0;
  // Four outputs at a time: transpose (RGB0 x 4) to R x 4, G x 4, B x 4 and store vectors.
  for (; x + 4 <= x1; x += 4) {
    __m128 p0 = one(x), p1 = one(x + 1), p2 = one(x + 2), p3 = one(x + 3);
    _MM_TRANSPOSE4_PS(p0, p1, p2, p3);  // p0 = R, p1 = G, p2 = B
    if (flip) {
      const int xo = out - 4 - x;  // outputs x..x+3 land at xo+3..xo
      _mm_storeu_ps(dst + xo, _mm_shuffle_ps(p0, p0, 0x1B));
      _mm_storeu_ps(dst + out + xo, _mm_shuffle_ps(p1, p1, 0x1B));
      _mm_storeu_ps(dst + 2 * out + xo, _mm_shuffle_ps(p2, p2, 0x1B));
    } else {
      _mm_storeu_ps(dst + x, p0);
      _mm_storeu_ps(dst + out + x, p1);
      _mm_storeu_ps(dst + 2 * out + x, p2);
    }
  }
  for (; x < x1; ++x) {
    const int xo = flip ? out - 1 - x : x;
    alignas(16) float a4[4];
    _mm_store_ps(a4, one(x));
    dst[xo] = a4[0];
    dst[out + xo] = a4[1];
    dst[2 * out + xo] = a4[2];
  }
}
#endif

#if defined(__AVX2__)
// As row_h_i16, two outputs per 256-bit madd (x in the low lane, x + 4 in the high lane):
// 8 outputs per step, transposed lane-wise to R x 8, G x 8, B x 8. Returns the first output
// it did not handle (groups of 8 entirely below x1).
template <int TP>
static int row_h_i16_avx2(const uint8_t* row, int col_base, const AxisWeights& ax, bool flip, float* dst,
                          int x1) {
  const int out = ax.out, KP = ax.KP;
  const __m256i shuf = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
                                        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1);
  const __m256i shuf2 = _mm256_add_epi8(shuf, _mm256_setr_epi8(6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 0, 0, 0, 0,
                                                                6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 0, 0, 0, 0));
  const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const uint8_t* rb = row - (ptrdiff_t)col_base * 3;  // + off3[x]: output x's first tap
  int x = 0;
  for (; x + 8 <= x1; x += 8) {
    const int32_t* wg = &ax.wvec[(size_t)(x / 8) * 4 * KP * 8];
    __m256 v[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const uint8_t* a = rb + ax.off3[x + j];
      const uint8_t* b = rb + ax.off3[x + j + 4];
      const int32_t* wj = wg + (size_t)j * KP * 8;
      __m256i acc = _mm256_setzero_si256();
      int p = 0;
      // Two tap pairs per 16-byte load (pixels 2p .. 2p+4): half the loads and lane inserts.
#pragma GCC unroll 4
      for (; p + 2 <= TP; p += 2) {
        const __m256i px = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(a + 6 * p))),
            _mm_loadu_si128((const __m128i*)(b + 6 * p)), 1);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_shuffle_epi8(px, shuf),
                                                      _mm256_loadu_si256((const __m256i*)(wj + 8 * p))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_shuffle_epi8(px, shuf2),
                                                      _mm256_loadu_si256((const __m256i*)(wj + 8 * p + 8))));
      }
      for (; p < TP; ++p) {
        __m256i px = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i*)(a + 6 * p))),
                                             _mm_loadl_epi64((const __m128i*)(b + 6 * p)), 1);
        px = _mm256_shuffle_epi8(px, shuf);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(px, _mm256_loadu_si256((const __m256i*)(wj + 8 * p))));
      }
      v[j] = _mm256_cvtepi32_ps(acc);  // [x+j: R G B 0 | x+j+4: R G B 0]
    }
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpacklo_ps(v[2], v[3]);
    const __m256 t2 = _mm256_unpackhi_ps(v[0], v[1]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 R = _mm256_shuffle_ps(t0, t1, 0x44), G = _mm256_shuffle_ps(t0, t1, 0xEE),
           B = _mm256_shuffle_ps(t2, t3, 0x44);
    int xo = x;
    if (flip) {
      xo = out - 8 - x;
      R = _mm256_permutevar8x32_ps(R, rev);
      G = _mm256_permutevar8x32_ps(G, rev);
      B = _mm256_permutevar8x32_ps(B, rev);
    }
    _mm256_storeu_ps(dst + xo, R);
    _mm256_storeu_ps(dst + out + xo, G);
    _mm256_storeu_ps(dst + 2 * out + xo, B);
  }
  return x;
}
#endif

// Float fallback (and the outputs whose wide loads would leave the buffer); same units.
static void row_h_generic(const uint8_t* row, int col_base, const AxisWeights& ax, bool flip, float* dst,
                          int x0, int x1) {
  const int out = ax.out, K = ax.K;
  for (int x = x0; x < x1; ++x) {
    const float* w = &ax.w[(size_t)x * K];
    const uint8_t* s = row + (size_t)(ax.start[x] - col_base) * 3;
    const int n = ax.count[x];
    float r = 0.f, g = 0.f, b = 0.f;
    for (int k = 0; k < n; ++k) {
      r += w[k] * s[3 * k];
      g += w[k] * s[3 * k + 1];
      b += w[k] * s[3 * k + 2];
    }
    const int xo = flip ? out - 1 - x : x;
    dst[xo] = r * (float)kOne;
    dst[out + xo] = g * (float)kOne;
    dst[2 * out + xo] = b * (float)kOne;
  }
}

void resize_row_h(const uint8_t* row, int col_base, const AxisWeights& ax, bool flip, float* dst,
                  int64_t safe_bytes) {
  const int out = ax.out;
#if defined(__SSE4_1__)
  if (ax.taps > 0 && ax.KP <= 8) {
    // Outputs are sorted by start: those whose loads would pass safe_bytes form a tail.
    const int64_t reach = 6 * (int64_t)ax.KP + 2;
    int x1 = out;
    while (x1 > 0 && (int64_t)(ax.start[x1 - 1] - col_base) * 3 + reach > safe_bytes) --x1;
#if defined(__AVX2__)
    // The AVX2 pass loads 16 bytes at pixel 2p (p even < KP): up to 6 * KP + 10 bytes.
    int x1w = x1;
    while (x1w > 0 && (int64_t)(ax.start[x1w - 1] - col_base) * 3 + 6 * (int64_t)ax.KP + 10 > safe_bytes) --x1w;
#endif
    switch (ax.KP) {
#if defined(__AVX2__)
#define FL_CASE(T)                                                               \
  case T: {                                                                      \
    const int xa = ax.wvec.empty() ? 0 : row_h_i16_avx2<T>(row, col_base, ax, flip, dst, x1w); \
    row_h_i16<T>(row, col_base, ax, flip, dst, xa, x1);                          \
  } break;
#else
#define FL_CASE(T) \
  case T:          \
    row_h_i16<T>(row, col_base, ax, flip, dst, 0, x1); break;
#endif
      FL_CASE(1) FL_CASE(2) FL_CASE(3) FL_CASE(4) FL_CASE(5) FL_CASE(6) FL_CASE(7) FL_CASE(8)
#undef FL_CASE
    }
    row_h_generic(row, col_base, ax, flip, dst, x1, out);
    return;
  }
#endif
  (void)safe_bytes;
  row_h_generic(row, col_base, ax, flip, dst, 0, out);
}

void VStream::begin(const AxisWeights* a, int rl, std::vector<float>& buf, uint8_t* o) {
  ay = a;
  row_len = rl;
  R = a->K;
  if (buf.size() < (size_t)R * rl) buf.resize((size_t)R * rl);
  ring = buf.data();
  out = o;
  next_y = 0;
  end_y = a->out;
}

void VStream::window(int y0, int y1, int* rlo, int* rhi) {
  y0 = std::max(0, y0);
  y1 = std::min(ay->out, y1);
  if (y1 <= y0) y1 = y0 = 0;
  next_y = y0;
  end_y = y1;
  int lo = ay->tap_hi, hi = ay->tap_lo;
  for (int y = y0; y < y1; ++y) {
    lo = std::min(lo, ay->start[y]);
    hi = std::max(hi, ay->start[y] + ay->count[y]);
  }
  if (hi <= lo) hi = lo;
  *rlo = lo;
  *rhi = hi;
}

#if defined(__F16C__)
static inline void store_f16(uint16_t* d, __m128 v) { _mm_storel_epi64((__m128i*)d, _mm_cvtps_ph(v, 0)); }
#endif

// Round (half-even) and clamp like the uint8 image would, then normalize into the output.
void emit_direct(const DirectOut& D, int c, const float* acc, size_t off, int m) {
  const float sc = D.scale[c], bi = D.bias[c];
  int x = 0;
  if (D.dtype == 2) {
    store_u8(acc, (uint8_t*)D.planes[c] + off, m);
    return;
  }
#if defined(__AVX2__) && defined(__FMA__)
  {
    const __m256 vs8 = _mm256_set1_ps(sc), vb8 = _mm256_set1_ps(bi), lo8 = _mm256_setzero_ps(),
                 hi8 = _mm256_set1_ps(255.f);
    for (; x + 8 <= m; x += 8) {
      __m256 v = _mm256_round_ps(_mm256_load_ps(acc + x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_fmadd_ps(_mm256_min_ps(_mm256_max_ps(v, lo8), hi8), vs8, vb8);
      if (D.dtype == 0) {
        float* d = (float*)D.planes[c] + off + x;
        if (((uintptr_t)d & 31) == 0)
          _mm256_stream_ps(d, v);  // see below: no read-for-ownership of output lines
        else
          _mm256_storeu_ps(d, v);
      } else {
        _mm_storeu_si128((__m128i*)((uint16_t*)D.planes[c] + off + x), _mm256_cvtps_ph(v, 0));
      }
    }
  }
#endif
#if defined(__SSE4_1__)
  const __m128 vs = _mm_set1_ps(sc), vb = _mm_set1_ps(bi), lo = _mm_setzero_ps(), hi = _mm_set1_ps(255.f);
  for (; x + 4 <= m; x += 4) {
    __m128 v = _mm_round_ps(_mm_loadu_ps(acc + x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm_min_ps(_mm_max_ps(v, lo), hi);
    v = _mm_add_ps(_mm_mul_ps(v, vs), vb);
    if (D.dtype == 0) {
      float* d = (float*)D.planes[c] + off + x;
      // Non-temporal stores: the batch is far larger than the caches and read later by
      // someone else; this skips the read-for-ownership of every output line.
      if (((uintptr_t)d & 15) == 0)
        _mm_stream_ps(d, v);
      else
        _mm_storeu_ps(d, v);
    } else {
#if defined(__F16C__)
      store_f16((uint16_t*)D.planes[c] + off + x, v);
#else
      alignas(16) float t[4];
      _mm_store_ps(t, v);
      for (int k = 0; k < 4; ++k) ((uint16_t*)D.planes[c])[off + x + k] = float_to_half(t[k]);
#endif
    }
  }
#endif
  for (; x < m; ++x) {
    float v = acc[x];
    v = v > 0.f ? v : 0.f;
    v = v < 255.f ? v : 255.f;
    v = std::nearbyint(v) * sc + bi;
    if (D.dtype == 0)
      ((float*)D.planes[c])[off + x] = v;
    else
      ((uint16_t*)D.planes[c])[off + x] = float_to_half(v);
  }
}

// acc[0, m) = sum_k w[k] * inv * row(s0 + k)[c0 + x]: 16 outputs at a time held in
// registers across the taps (one store per output, not one per tap).
void VStream::vertical_taps(const float* w, int n, float inv, int s0, int c0, int m, float* acc) {
  int x = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // 32 outputs at a time in four 8-wide accumulators held across the taps.
  if (n <= 32) {
    const float* rows[32];
    __m256 wv[32];
    for (int k = 0; k < n; ++k) {
      rows[k] = slot(s0 + k) + c0;
      wv[k] = _mm256_set1_ps(w[k] * inv);
    }
    for (; x + 32 <= m; x += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < n; ++k) {
        const float* t = rows[k] + x;
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(t), wv[k], a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 8), wv[k], a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 16), wv[k], a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 24), wv[k], a3);
      }
      _mm256_store_ps(acc + x, a0);
      _mm256_store_ps(acc + x + 8, a1);
      _mm256_store_ps(acc + x + 16, a2);
      _mm256_store_ps(acc + x + 24, a3);
    }
    for (; x + 8 <= m; x += 8) {
      __m256 a0 = _mm256_setzero_ps();
      for (int k = 0; k < n; ++k) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(rows[k] + x), wv[k], a0);
      _mm256_store_ps(acc + x, a0);
    }
  }
#elif defined(__SSE4_1__)
  if (n <= 32) {
    const float* rows[32];
    __m128 wv[32];
    for (int k = 0; k < n; ++k) {
      rows[k] = slot(s0 + k) + c0;
      wv[k] = _mm_set1_ps(w[k] * inv);
    }
    for (; x + 16 <= m; x += 16) {
      __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < n; ++k) {
        const float* t = rows[k] + x;
        a0 = madd(_mm_loadu_ps(t), wv[k], a0);
        a1 = madd(_mm_loadu_ps(t + 4), wv[k], a1);
        a2 = madd(_mm_loadu_ps(t + 8), wv[k], a2);
        a3 = madd(_mm_loadu_ps(t + 12), wv[k], a3);
      }
      _mm_store_ps(acc + x, a0);
      _mm_store_ps(acc + x + 4, a1);
      _mm_store_ps(acc + x + 8, a2);
      _mm_store_ps(acc + x + 12, a3);
    }
  }
#endif
  if (x < m) {
    for (int i = x; i < m; ++i) acc[i] = 0.f;
    for (int k = 0; k < n; ++k) {
      const float wk = w[k] * inv;
      const float* t = slot(s0 + k) + c0;
      for (int i = x; i < m; ++i) acc[i] += wk * t[i];
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline void emit8(__m256 a, __m256 vs, __m256 vb, float* d) {
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.f);
  __m256 v = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_fmadd_ps(_mm256_min_ps(_mm256_max_ps(v, lo), hi), vs, vb);
  if (((uintptr_t)d & 31) == 0)
    _mm256_stream_ps(d, v);  // as in emit_direct: no read-for-ownership of output lines
  else
    _mm256_storeu_ps(d, v);
}
static inline void emit8(__m256 a, __m256 vs, __m256 vb, uint16_t* d) {
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.f);
  __m256 v = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_fmadd_ps(_mm256_min_ps(_mm256_max_ps(v, lo), hi), vs, vb);
  _mm_storeu_si128((__m128i*)d, _mm256_cvtps_ph(v, 0));
}

// The float32 / float16 direct path of row_done with the vertical taps and the rounding /
// normalize / store fused: accumulators go to the output without a round trip through `acc`.
// Same arithmetic as vertical_taps + emit_direct (bit-identical results).
template <typename T>
void VStream::emit_fused(const float* w, int n, float inv, int s0, int y, int ow, float* acc) {
  const float* rows[32];
  __m256 wv[32];
  for (int k = 0; k < n; ++k) {
    rows[k] = slot(s0 + k);
    wv[k] = _mm256_set1_ps(w[k] * inv);
  }
  for (int c = 0; c < 3; ++c) {
    T* d = (T*)direct->planes[c] + (size_t)y * ow;
    const __m256 vs = _mm256_set1_ps(direct->scale[c]), vb = _mm256_set1_ps(direct->bias[c]);
    const int c0 = c * ow;
    int x = 0;
    for (; x + 32 <= ow; x += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < n; ++k) {
        const float* t = rows[k] + c0 + x;
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(t), wv[k], a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 8), wv[k], a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 16), wv[k], a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(t + 24), wv[k], a3);
      }
      emit8(a0, vs, vb, d + x);
      emit8(a1, vs, vb, d + x + 8);
      emit8(a2, vs, vb, d + x + 16);
      emit8(a3, vs, vb, d + x + 24);
    }
    for (; x + 8 <= ow; x += 8) {
      __m256 a0 = _mm256_setzero_ps();
      for (int k = 0; k < n; ++k) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(rows[k] + c0 + x), wv[k], a0);
      emit8(a0, vs, vb, d + x);
    }
    if (x < ow) {  // the last < 8 values: the unfused path
      vertical_taps(w, n, inv, s0, c0 + x, ow - x, acc);
      emit_direct(*direct, c, acc, (size_t)y * ow + x, ow - x);
    }
  }
}
#endif

void VStream::row_done(int r) {
  constexpr int C = 512;
  const float inv_one = 1.0f / (float)kOne;  // the horizontal pass works in 1/kOne units
  alignas(32) float acc[C];
  const int ow = row_len / 3;
  while (next_y < end_y && ay->start[next_y] + ay->count[next_y] - 1 <= r) {
    const int y = next_y++;
    const float* w = &ay->w[(size_t)y * ay->K];
    const int n = ay->count[y], s0 = ay->start[y];
    uint8_t* o = out ? out + (size_t)y * row_len : nullptr;
#if defined(__AVX2__) && defined(__FMA__)
    if (direct && direct->dtype != 2 && n <= 32) {
      if (direct->dtype == 0)
        emit_fused<float>(w, n, inv_one, s0, y, ow, acc);
      else
        emit_fused<uint16_t>(w, n, inv_one, s0, y, ow, acc);
      continue;
    }
#endif
    for (int c = 0; c < 3; ++c) {
      for (int x0 = 0; x0 < ow; x0 += C) {
        const int m = std::min(C, ow - x0), c0 = c * ow + x0;
        vertical_taps(w, n, inv_one, s0, c0, m, acc);
        if (direct)
          emit_direct(*direct, c, acc, (size_t)y * ow + x0, m);
        else
          store_u8(acc, o + c0, m);
      }
    }
  }
}

int render_u8(const Source& src, const uint16_t crop[4], bool flip, int oh, int ow, bool bicubic,
              int dct, int resize, Scratch& s, uint8_t* out) {
  const bool pil = resize != kResizeTorch;
  if (src.kind == 0) {
#ifdef FASTLOAD_HAVE_JPEG
    if (pil) return jpeg_render_pil(src.data, (size_t)src.len, crop, flip, oh, ow, bicubic, resize == kResizePil, s, out);
    return jpeg_render(src.data, (size_t)src.len, crop, flip, oh, ow, bicubic, dct, s, out);
#else
    return fail("built without libjpeg: decode JPEGs before calling the kernel");
#endif
  }
  if (src.kind != 1) return fail("unknown source kind %d", src.kind);
  const int H = src.h, W = src.w;
  if (H <= 0 || W <= 0 || src.data == nullptr) return fail("empty raw image");
  if (src.len < (int64_t)H * W * 3) return fail("raw image buffer too small for %dx%dx3", H, W);
  int t, l, bh, bw;
  box_to_pixels(crop, H, W, &t, &l, &bh, &bw);
  if (pil) {
    PilStream ps;
    ps.begin(bh, bw, oh, ow, bicubic, flip, resize == kResizePil, s.pil, out, s.direct, s.win_y0, s.win_y1);
    for (int y = ps.row_lo; y < ps.row_hi; ++y) ps.push(y, src.data + ((size_t)(t + y) * W + l + ps.col_lo) * 3);
    return 0;
  }
  compute_axis_weights(ow, l, bw, l, l + bw, bicubic, s.ax, true);
  compute_axis_weights(oh, t, bh, t, t + bh, bicubic, s.ay, false);
  VStream vs;
  vs.begin(&s.ay, ow * 3, s.tmp, out);
  vs.direct = s.direct;
  int rlo = s.ay.tap_lo, rhi = s.ay.tap_hi;
  if (s.win_y1 > s.win_y0) vs.window(s.win_y0, s.win_y1, &rlo, &rhi);
  for (int y = rlo; y < rhi; ++y) {
    // Wide loads may read into the next rows, never past the image.
    resize_row_h(src.data + (size_t)y * W * 3, 0, s.ax, flip, vs.slot(y), (int64_t)(H - y) * W * 3);
    vs.row_done(y);
  }
  return 0;
}

}  // namespace fl
