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
  int tlo = hi, thi = lo;
  for (int i = 0; i < out; ++i) {
    double center = x0 + scale * (i + 0.5);
    // torch truncates toward zero then clamps at 0; with the clamp at lo the two agree.
    int xmin = std::max((int)std::floor(center - support + 0.5), lo);
    int xmax = std::min((int)std::floor(center + support + 0.5), hi);
    if (xmax <= xmin) {  // degenerate (never for a valid box): nearest pixel
      xmin = std::min(std::max((int)std::floor(center), lo), hi - 1);
      xmax = xmin + 1;
    }
    const int nn = std::min(xmax - xmin, K);
    float* wp = &aw.w[(size_t)i * K];
    double total = 0.0;
    for (int j = 0; j < nn; ++j) {
      double wv = bicubic ? filter_bicubic((j + xmin - center + 0.5) * invscale)
                          : filter_bilinear((j + xmin - center + 0.5) * invscale);
      wp[j] = (float)wv;
      total += wv;
    }
    const double inv = total != 0.0 ? 1.0 / total : 0.0;
    for (int j = 0; j < K; ++j) wp[j] = j < nn ? (float)(wp[j] * inv) : 0.0f;
    aw.start[i] = xmin;
    aw.count[i] = nn;
    tlo = std::min(tlo, xmin);
    thi = std::max(thi, xmin + nn);
  }
  // Give every output the same tap count (the widest), zero-padded and kept inside [lo, hi):
  // fixed-count inner loops unroll and overlap across outputs.
  int kmax = 1;
  for (int i = 0; i < out; ++i) kmax = std::max(kmax, aw.count[i]);
  if (kmax <= hi - lo) {
    tlo = hi;
    thi = lo;
    for (int i = 0; i < out; ++i) {
      float* wp = &aw.w[(size_t)i * K];
      const int n = aw.count[i];
      if (n < kmax) {
        const int s0 = aw.start[i], s1 = std::min(s0, hi - kmax), sh = s0 - s1;
        for (int j = kmax - 1; j >= 0; --j) wp[j] = (j - sh >= 0 && j - sh < n) ? wp[j - sh] : 0.0f;
        aw.start[i] = s1;
        aw.count[i] = kmax;
      }
      tlo = std::min(tlo, aw.start[i]);
      thi = std::max(thi, aw.start[i] + kmax);
    }
    aw.taps = kmax;
    // int16 weight pairs (14 fractional bits) for the horizontal pmaddwd pass; the rounded
    // weights of each output are nudged to sum to exactly 1.0 (no DC gain error). The
    // vertical axis reads only the float weights and skips these tables.
    const int KP = (kmax + 1) / 2;
    aw.KP = int16 ? KP : 0;
    aw.wpair.assign(int16 && kmax <= 16 ? (size_t)out * KP : 0, 0);
    for (int i = 0; i < out && int16 && kmax <= 16; ++i) {
      const float* wp = &aw.w[(size_t)i * K];
      int16_t q[16] = {0};
      int sum = 0, big = 0;
      for (int j = 0; j < kmax; ++j) {
        q[j] = (int16_t)std::lrint(wp[j] * (double)kOne);
        sum += q[j];
        if (std::abs(q[j]) > std::abs(q[big])) big = j;
      }
      q[big] = (int16_t)(q[big] + (kOne - sum));
      for (int p = 0; p < KP; ++p)
        aw.wpair[(size_t)i * KP + p] = (int32_t)((uint32_t)(uint16_t)q[2 * p] | ((uint32_t)(uint16_t)q[2 * p + 1] << 16));
    }
#if defined(__AVX2__)
    const int G = int16 && kmax <= 16 ? out / 8 : 0;
    aw.wvec.resize((size_t)G * 4 * KP * 8);
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < 4; ++j)
        for (int p = 0; p < KP; ++p) {
          int32_t* d = &aw.wvec[(((size_t)g * 4 + j) * KP + p) * 8];
          for (int k = 0; k < 4; ++k) {
            d[k] = aw.wpair[(size_t)(8 * g + j) * KP + p];
            d[4 + k] = aw.wpair[(size_t)(8 * g + j + 4) * KP + p];
          }
        }
#endif
    aw.off3.resize(int16 ? out : 0);
    for (int i = 0; i < out && int16; ++i) aw.off3[i] = 3 * aw.start[i];
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
static void emit_direct(const DirectOut& D, int c, const float* acc, size_t off, int m) {
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
              int dct, Scratch& s, uint8_t* out) {
  if (src.kind == 0) {
#ifdef FASTLOAD_HAVE_JPEG
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
