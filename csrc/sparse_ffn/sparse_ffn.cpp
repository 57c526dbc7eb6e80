// Sparse ReLU FFN down-projection on the CPU (exact).
//
// y[b, :] = sum_{j active} act[b, j] * Wt[j, :] (+ bias), where Wt = W_down^T is
// [d_ff, d_model] row-major and "active" is the union over the batch of act[b, j] != 0
// (NaN != 0, so a NaN activation counts as active and propagates like the dense path).
//
// Layout of the work: the active set is compacted once (indices + the activations packed
// [n_active, B] so the kernel reads them contiguously); threads then own disjoint column
// tiles of the output, so no reduction is needed and the sum order over neurons is fixed:
// the result is deterministic whatever the thread count. Inside a tile, each active
// neuron's row segment is loaded once (converted to fp32 on load for bf16/fp16) and
// FMA'd into per-thread fp32 accumulators for every batch row ("axpy per active neuron",
// PowerInfer-style). The tile width keeps B * tile fp32 accumulators inside L1.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fl_common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FL_SFFN_AVX2 1
#endif

FL_DEFINE_LAST_ERROR

namespace {

enum DType { F32 = 0, BF16 = 1, F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
#ifdef FL_SFFN_AVX2
  return _cvtsh_ss(h);
#endif
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
#ifdef FL_SFFN_AVX2
  return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffff;
  if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return (uint16_t)(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    man |= 0x800000;
    uint32_t shift = (uint32_t)(14 - exp);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return (uint16_t)(sign | half);
  }
  uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: correct
  return (uint16_t)h;
#endif
}

template <int DT> inline float to_f32(const void* p, long i) {
  if (DT == F32) return ((const float*)p)[i];
  if (DT == BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  return f16_to_f32(((const uint16_t*)p)[i]);
}

template <int DT> inline void store(void* p, long i, float v) {
  if (DT == F32) ((float*)p)[i] = v;
  else if (DT == BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
  else ((uint16_t*)p)[i] = f32_to_f16(v);
}

#ifdef FL_SFFN_AVX2
template <int DT> inline __m256 load8(const void* base, long i) {
  if (DT == F32) return _mm256_loadu_ps((const float*)base + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + i));
  if (DT == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// Per-thread scratch, grown only when a larger call arrives (no allocation per token).
struct Scratch {
  std::vector<float> acc;
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Union of the non-zero pattern over the batch, compacted. Returns the count; stops early
// (returning max_active + 1) once the count exceeds max_active.
template <int DT>
long compact(const void* act, long B, long d_ff, long max_active, std::vector<uint8_t>& mask,
             std::vector<int32_t>& idx) {
  mask.assign((size_t)d_ff, 0);
  uint8_t* m = mask.data();
  for (long b = 0; b < B; ++b) {
    if (DT == F32) {
      const float* a = (const float*)act + b * d_ff;
      for (long j = 0; j < d_ff; ++j) m[j] |= (uint8_t)(a[j] != 0.0f);  // NaN != 0: active
    } else {
      const uint16_t* a = (const uint16_t*)act + b * d_ff;
      for (long j = 0; j < d_ff; ++j) m[j] |= (uint8_t)((a[j] & 0x7fff) != 0);
    }
  }
  if ((long)idx.size() < d_ff) idx.resize((size_t)d_ff);
  int32_t* out = idx.data();
  long n = 0;
  for (long j = 0; j < d_ff; ++j) {
    out[n] = (int32_t)j;  // branch-free compaction
    n += m[j];
    if ((j & 1023) == 1023 && n > max_active) return max_active + 1;
  }
  return n > max_active ? max_active + 1 : n;
}

#ifdef FL_SFFN_AVX2
// Column blocks of the vector paths. fp32/fp16: 8 columns, one vector, natural order.
// bf16: 16 columns from one 256-bit load. A bf16 value is the high half of an fp32, so the
// even-indexed values become fp32 with one 16-bit shift and the odd-indexed ones with one
// mask: 1 instruction per 8 values instead of a zero-extend and a shift (the conversion,
// not memory, bounded the bf16 kernel: 4.2 G values/s in cache vs 8.2 for fp32, measured).
// Accumulators keep that (even, odd) order inside each 16-column block; the final store
// puts it back (acc_pos).
template <int DT> struct Blk {
  static constexpr int C = 8, N = 1;
  static inline void load(const void* base, long i, __m256* v) { v[0] = load8<DT>(base, i); }
};
template <> struct Blk<BF16> {
  static constexpr int C = 16, N = 2;
  static inline void load(const void* base, long i, __m256* v) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xffff0000u)));
  }
};
#endif

// Where column c of a tile of width w sits in the accumulators (see Blk).
template <int DT> inline long acc_pos(long c, long w) {
#ifdef FL_SFFN_AVX2
  if (DT == BF16 && c < w - w % 16) return (c & ~15L) + ((c & 15) >> 1) + ((c & 1) << 3);
#endif
  (void)w;
  return c;
}

template <int DT>
void down_tile(const float* vals, const int32_t* idx, long n, long B, const void* wt,
               long d_model, long c0, long c1, const void* bias, void* out, float* acc) {
  const long w = c1 - c0;
  std::memset(acc, 0, sizeof(float) * (size_t)(B * w));
  long k = 0;
#ifdef FL_SFFN_AVX2
  constexpr int C = Blk<DT>::C, N = Blk<DT>::N;
  if (B == 1) {
    // GEMV: groups of 8 neurons, one accumulator load/store per 8 FMAs; prefetch the start
    // of the next group's rows (random rows: the hardware prefetcher cannot guess them).
    for (; k + 8 <= n; k += 8) {
      long r[8];
      for (int q = 0; q < 8; ++q) r[q] = (long)idx[k + q] * d_model + c0;
      if (k + 16 <= n) {
        for (int q = 0; q < 8; ++q) {
          const char* p = (const char*)wt + ((long)idx[k + 8 + q] * d_model + c0) * (DT == F32 ? 4 : 2);
          _mm_prefetch(p, _MM_HINT_T0);
          _mm_prefetch(p + 64, _MM_HINT_T0);
          _mm_prefetch(p + 128, _MM_HINT_T0);
          _mm_prefetch(p + 192, _MM_HINT_T0);
        }
      }
      const float* a = vals + k;
      __m256 as[8];
      for (int q = 0; q < 8; ++q) as[q] = _mm256_set1_ps(a[q]);
      long c = 0;
      for (; c + C <= w; c += C) {
        // Two FMA chains (even rows into v, odd rows into u) halve the dependency depth.
        __m256 v[N], u[N], x[N];
        for (int h = 0; h < N; ++h) v[h] = _mm256_loadu_ps(acc + c + 8 * h);
        Blk<DT>::load(wt, r[1] + c, x);
        for (int h = 0; h < N; ++h) u[h] = _mm256_mul_ps(as[1], x[h]);
        for (int q = 0; q < 8; q += 2) {
          Blk<DT>::load(wt, r[q] + c, x);
          for (int h = 0; h < N; ++h) v[h] = _mm256_fmadd_ps(as[q], x[h], v[h]);
          if (q + 3 < 8) {
            Blk<DT>::load(wt, r[q + 3] + c, x);
            for (int h = 0; h < N; ++h) u[h] = _mm256_fmadd_ps(as[q + 3], x[h], u[h]);
          }
        }
        for (int h = 0; h < N; ++h) _mm256_storeu_ps(acc + c + 8 * h, _mm256_add_ps(v[h], u[h]));
      }
      for (; c < w; ++c) {  // same order as the vector loop: results do not depend on tiles
        float v = acc[c], u = a[1] * to_f32<DT>(wt, r[1] + c);
        v = std::fma(a[0], to_f32<DT>(wt, r[0] + c), v);
        u = std::fma(a[3], to_f32<DT>(wt, r[3] + c), u);
        v = std::fma(a[2], to_f32<DT>(wt, r[2] + c), v);
        u = std::fma(a[5], to_f32<DT>(wt, r[5] + c), u);
        v = std::fma(a[4], to_f32<DT>(wt, r[4] + c), v);
        u = std::fma(a[7], to_f32<DT>(wt, r[7] + c), u);
        v = std::fma(a[6], to_f32<DT>(wt, r[6] + c), v);
        acc[c] = v + u;
      }
    }
  }
  // Groups of 4 neurons: 4 row streams in flight and one accumulator load/store per 4 FMAs.
  for (; k + 4 <= n; k += 4) {
    const long r0 = (long)idx[k] * d_model + c0, r1 = (long)idx[k + 1] * d_model + c0;
    const long r2 = (long)idx[k + 2] * d_model + c0, r3 = (long)idx[k + 3] * d_model + c0;
    const float* a = vals + k * B;
    long c = 0;
    for (; c + C <= w; c += C) {
      __m256 w0[N], w1[N], w2[N], w3[N];
      Blk<DT>::load(wt, r0 + c, w0);
      Blk<DT>::load(wt, r1 + c, w1);
      Blk<DT>::load(wt, r2 + c, w2);
      Blk<DT>::load(wt, r3 + c, w3);
      for (long b = 0; b < B; ++b)
        for (int h = 0; h < N; ++h) {
          float* ab = acc + b * w + c + 8 * h;
          __m256 v = _mm256_loadu_ps(ab);
          v = _mm256_fmadd_ps(_mm256_set1_ps(a[b]), w0[h], v);
          v = _mm256_fmadd_ps(_mm256_set1_ps(a[B + b]), w1[h], v);
          v = _mm256_fmadd_ps(_mm256_set1_ps(a[2 * B + b]), w2[h], v);
          v = _mm256_fmadd_ps(_mm256_set1_ps(a[3 * B + b]), w3[h], v);
          _mm256_storeu_ps(ab, v);
        }
    }
    for (; c < w; ++c) {
      const float x0 = to_f32<DT>(wt, r0 + c), x1 = to_f32<DT>(wt, r1 + c);
      const float x2 = to_f32<DT>(wt, r2 + c), x3 = to_f32<DT>(wt, r3 + c);
      for (long b = 0; b < B; ++b) {
        float v = acc[b * w + c];
        v = std::fma(a[b], x0, v);
        v = std::fma(a[B + b], x1, v);
        v = std::fma(a[2 * B + b], x2, v);
        v = std::fma(a[3 * B + b], x3, v);
        acc[b * w + c] = v;
      }
    }
  }
#endif
  for (; k < n; ++k) {
    const long row = (long)idx[k] * d_model;
    const float* a = vals + k * B;
#ifdef FL_SFFN_AVX2
    long c = 0;
    for (; c + 32 <= w; c += 32) {  // 32 columns: 4 vectors in every dtype
      __m256 x[4];
      for (int q = 0; q < 32 / C; ++q) Blk<DT>::load(wt, row + c0 + c + q * C, x + q * N);
      for (long b = 0; b < B; ++b) {
        if (a[b] == 0.0f) continue;  // weights are checked finite, so 0 * w adds exactly 0
        const __m256 av = _mm256_set1_ps(a[b]);
        float* ab = acc + b * w + c;
        for (int h = 0; h < 4; ++h)
          _mm256_storeu_ps(ab + 8 * h, _mm256_fmadd_ps(av, x[h], _mm256_loadu_ps(ab + 8 * h)));
      }
    }
    for (; c + C <= w; c += C) {
      __m256 x[N];
      Blk<DT>::load(wt, row + c0 + c, x);
      for (long b = 0; b < B; ++b) {
        if (a[b] == 0.0f) continue;
        const __m256 av = _mm256_set1_ps(a[b]);
        float* ab = acc + b * w + c;
        for (int h = 0; h < N; ++h)
          _mm256_storeu_ps(ab + 8 * h, _mm256_fmadd_ps(av, x[h], _mm256_loadu_ps(ab + 8 * h)));
      }
    }
    for (; c < w; ++c) {
      const float wv = to_f32<DT>(wt, row + c0 + c);
      for (long b = 0; b < B; ++b)
        if (a[b] != 0.0f) acc[b * w + c] = std::fma(a[b], wv, acc[b * w + c]);
    }
#else
    for (long b = 0; b < B; ++b) {
      const float ab = a[b];
      if (ab == 0.0f) continue;
      float* accb = acc + b * w;
      for (long c = 0; c < w; ++c) accb[c] += ab * to_f32<DT>(wt, row + c0 + c);
    }
#endif
  }
  for (long b = 0; b < B; ++b)
    for (long c = 0; c < w; ++c) {
      float v = acc[b * w + acc_pos<DT>(c, w)];
      if (bias) v += to_f32<DT>(bias, c0 + c);
      store<DT>(out, b * d_model + c0 + c, v);
    }
}

template <int DT>
int down(const void* act, long B, long d_ff, const void* wt, long d_model, const void* bias,
         void* out, long max_active, int nthreads, long* n_active) {
  static thread_local std::vector<uint8_t> mask;
  static thread_local std::vector<int32_t> idx;
  static thread_local std::vector<float> vals;
  const long n = compact<DT>(act, B, d_ff, max_active, mask, idx);
  *n_active = n;
  if (n > max_active) return 0;  // the caller takes the dense path
  if ((long)vals.size() < n * B) vals.resize((size_t)(n * B));
  for (long k = 0; k < n; ++k)
    for (long b = 0; b < B; ++b) vals[k * B + b] = to_f32<DT>(act, b * d_ff + idx[k]);
  if (nthreads <= 0) nthreads = fl::default_threads();
  // Tile width: B * tile fp32 accumulators within ~32 KiB (L1/L2), a multiple of 64
  // columns, and small enough that there are >= 8 tiles per thread: tiles are claimed
  // dynamically, so a thread slowed by another process simply takes fewer of them (each
  // tile's sum order is fixed, so the result stays deterministic). Tiles stay >= 256
  // columns (1 KiB fp32 per row segment) so the hardware prefetcher keeps streaming.
  // (B == 1: up to 4096 columns, so a row streams as one long segment.)
  long tile = B == 1 ? 4096 : 8192 / B;
  if (tile > 4096) tile = 4096;
  if (B > 1 && tile > 2048) tile = 2048;
  if (nthreads > 1) {
    long fine = d_model / (8L * nthreads);
    if (fine < 256) fine = 256;
    if (tile > fine) tile = fine;
  }
  tile = (tile + 63) / 64 * 64;
  if (tile < 64) tile = 64;
  const long ntiles = (d_model + tile - 1) / tile;
  const float* pv = vals.data();
  const int32_t* pi = idx.data();
  return fl::parallel_for(ntiles, nthreads, 1, [&](long t0, long t1, int) {
    Scratch& s = scratch();
    if ((long)s.acc.size() < B * tile) s.acc.resize((size_t)(B * tile));
    for (long t = t0; t < t1; ++t) {
      const long c0 = t * tile, c1 = c0 + tile < d_model ? c0 + tile : d_model;
      down_tile<DT>(pv, pi, n, B, wt, d_model, c0, c1, bias, out, s.acc.data());
    }
  });
}

}  // namespace

// out[B, d_model] = act[B, d_ff] @ wt[d_ff, d_model] (+ bias), reading only the rows of wt
// whose neuron is non-zero for some batch row. act, wt, bias and out share `dtype`
// (0 fp32, 1 bf16, 2 fp16); accumulation is fp32. If more than max_active neurons are
// active, nothing is computed, *n_active = max_active + 1, and the caller runs dense.
// out_cap: the values `out` holds (>= B * d_model).
FL_EXPORT int fl_sffn_down(const void* act, long B, long d_ff, const void* wt, long d_model,
                           int dtype, const void* bias, void* out, long out_cap, long max_active,
                           int nthreads, long* n_active) {
  return fl::guard("fl_sffn_down", [&]() -> int {
  if (!act || !wt || !out || !n_active) return fl::fail("fl_sffn_down: null pointer");
  if (B < 0 || d_ff < 0 || d_model <= 0)
    return fl::fail("fl_sffn_down: bad shape B=%ld d_ff=%ld d_model=%ld", B, d_ff, d_model);
  if ((double)B * (double)d_model > (double)out_cap)
    return fl::fail("fl_sffn_down: output of %ld values is too small for %ld x %ld", out_cap, B, d_model);
  if (B == 0) { *n_active = 0; return 0; }
  switch (dtype) {
    case F32: return down<F32>(act, B, d_ff, wt, d_model, bias, out, max_active, nthreads, n_active);
    case BF16: return down<BF16>(act, B, d_ff, wt, d_model, bias, out, max_active, nthreads, n_active);
    case F16: return down<F16>(act, B, d_ff, wt, d_model, bias, out, max_active, nthreads, n_active);
    default: return fl::fail("fl_sffn_down: unknown dtype code %d", dtype);
  }
  });
}

// Indices (ascending) of the neurons non-zero for some batch row; returns the count in *n.
// idx_cap: the values idx_out holds (>= d_ff: every neuron may be active).
FL_EXPORT int fl_sffn_active(const void* act, long B, long d_ff, int dtype, int32_t* idx_out,
                             long idx_cap, long* n) {
  return fl::guard("fl_sffn_active", [&]() -> int {
  if (!act || !idx_out || !n) return fl::fail("fl_sffn_active: null pointer");
  if (B < 0 || d_ff < 0 || idx_cap < d_ff)
    return fl::fail("fl_sffn_active: index output of %ld values for d_ff=%ld (B=%ld)", idx_cap, d_ff, B);
  std::vector<uint8_t> mask;
  std::vector<int32_t> idx;
  long c;
  switch (dtype) {
    case F32: c = compact<F32>(act, B, d_ff, d_ff, mask, idx); break;
    case BF16: c = compact<BF16>(act, B, d_ff, d_ff, mask, idx); break;
    case F16: c = compact<F16>(act, B, d_ff, d_ff, mask, idx); break;
    default: return fl::fail("fl_sffn_active: unknown dtype code %d", dtype);
  }
  if (c > 0) std::memcpy(idx_out, idx.data(), sizeof(int32_t) * (size_t)c);
  *n = c;
  return 0;
  });
}
