// The fused replay kernel's C entry points: a batch of (source, stored augmentation record)
// -> crop -> antialiased resize -> flip -> RandAugment -> normalize -> erase -> MixUp ->
// CutMix, written NCHW straight into the caller's (pinned) output, one sample per task on
// the shared thread pool. Errors are per sample: the first failing position is returned
// with its message; a bad sample never takes the process down.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "fl_aug.h"
#include "fl_common.h"
#include "randaugment.h"
#include "replay_impl.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace fl {
// Weak: the library still loads (and fails clearly on RandAugment records) if RandAugment's
// translation unit is absent from a build.
int randaugment_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, int n,
                      int num_bins, uint8_t* scratch) __attribute__((weak));
int randaugment_apply_values(uint8_t* img, int h, int w, const uint8_t* ops, const float* vals, int n,
                             int grid_h, int grid_w, uint8_t* scratch, int semantics) __attribute__((weak));
int ra_timm_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, const float* vals, int n,
                  const uint8_t fill[3], uint8_t* scratch) __attribute__((weak));
}  // namespace fl

namespace {

using fl::Aug;
using fl::Scratch;
using fl::Source;

enum OutType { kF32 = 0, kF16 = 1, kU8 = 2 };

struct Job {
  const Source* srcs;
  const Source* partners;  // may be null; entries with data == null are "none"
  const Aug* augs;
  void* out;
  int dtype, oh, ow, bicubic, dct, num_bins;
  float scale[3], bias[3], mean255[3];
  const fl::AugExt* ext = nullptr;  // schema-v2 extension records (may be null)
  int grid_h = 0, grid_w = 0;       // the box grid float translations were sampled on
  bool timm = false;                // timm RandAugment semantics (levels in the extension)
  uint8_t fill[3] = {0, 0, 0};      // its geometric ops' fill colour
  int resize = fl::kResizeTorch;    // the crop resize's arithmetic (ReplayOptions::resize)
};

// The erase fill of channel c: the mean colour (0 after Normalize), or black before
// Normalize for ml-dr records (-mean/std after it; 0 in uint8 output).
inline float erase_fill(const Job& J, int c, bool black) {
  const bool norm = J.dtype != kU8;
  if (black) return norm ? J.bias[c] : 0.f;
  return norm ? 0.f : J.mean255[c];
}

struct TLS {
  Scratch s;
  std::vector<uint8_t> img, pimg, hwc, ra, deint, phwc;
  std::vector<float> row, prow;
};

TLS& tls() {
  static thread_local TLS t;
  return t;
}


// Planar <-> interleaved RGB rows, 16 pixels per step with byte shuffles (the scalar byte
// loops were the largest cost of the RandAugment path after the ops themselves).
struct ShufMasks {
  alignas(16) int8_t to_hwc[3][3][16];    // [out block][channel]
  alignas(16) int8_t to_planar[3][3][16]; // [channel][in block]
  ShufMasks() {
    for (int o = 0; o < 3; ++o)
      for (int c = 0; c < 3; ++c)
        for (int i = 0; i < 16; ++i) {
          const int k = 16 * o + i;
          to_hwc[o][c][i] = (k % 3 == c) ? (int8_t)(k / 3) : (int8_t)-128;
        }
    for (int c = 0; c < 3; ++c)
      for (int o = 0; o < 3; ++o)
        for (int p = 0; p < 16; ++p) {
          const int k = 3 * p + c;
          to_planar[c][o][p] = (k / 16 == o) ? (int8_t)(k % 16) : (int8_t)-128;
        }
  }
};
const ShufMasks& shuf_masks() {
  static const ShufMasks m;
  return m;
}

void planar_to_hwc(const uint8_t* r, const uint8_t* g, const uint8_t* b, uint8_t* d, int n) {
  int x = 0;
#if defined(__SSSE3__)
  const ShufMasks& M = shuf_masks();
  for (; x + 16 <= n; x += 16) {
    const __m128i in[3] = {_mm_loadu_si128((const __m128i*)(r + x)), _mm_loadu_si128((const __m128i*)(g + x)),
                           _mm_loadu_si128((const __m128i*)(b + x))};
    for (int o = 0; o < 3; ++o) {
      __m128i v = _mm_shuffle_epi8(in[0], _mm_load_si128((const __m128i*)M.to_hwc[o][0]));
      v = _mm_or_si128(v, _mm_shuffle_epi8(in[1], _mm_load_si128((const __m128i*)M.to_hwc[o][1])));
      v = _mm_or_si128(v, _mm_shuffle_epi8(in[2], _mm_load_si128((const __m128i*)M.to_hwc[o][2])));
      _mm_storeu_si128((__m128i*)(d + 3 * x + 16 * o), v);
    }
  }
#endif
  for (; x < n; ++x) {
    d[3 * x] = r[x];
    d[3 * x + 1] = g[x];
    d[3 * x + 2] = b[x];
  }
}

void hwc_to_planar(const uint8_t* s, uint8_t* r, uint8_t* g, uint8_t* b, int n) {
  int x = 0;
#if defined(__SSSE3__)
  const ShufMasks& M = shuf_masks();
  uint8_t* outs[3] = {r, g, b};
  for (; x + 16 <= n; x += 16) {
    const __m128i in[3] = {_mm_loadu_si128((const __m128i*)(s + 3 * x)),
                           _mm_loadu_si128((const __m128i*)(s + 3 * x + 16)),
                           _mm_loadu_si128((const __m128i*)(s + 3 * x + 32))};
    for (int c = 0; c < 3; ++c) {
      __m128i v = _mm_shuffle_epi8(in[0], _mm_load_si128((const __m128i*)M.to_planar[c][0]));
      v = _mm_or_si128(v, _mm_shuffle_epi8(in[1], _mm_load_si128((const __m128i*)M.to_planar[c][1])));
      v = _mm_or_si128(v, _mm_shuffle_epi8(in[2], _mm_load_si128((const __m128i*)M.to_planar[c][2])));
      _mm_storeu_si128((__m128i*)(outs[c] + x), v);
    }
  }
#endif
  for (; x < n; ++x) {
    r[x] = s[3 * x];
    g[x] = s[3 * x + 1];
    b[x] = s[3 * x + 2];
  }
}

// Output stores: non-temporal where the row is aligned (the batch is written once and read
// by the consumer much later: no read-for-ownership of its cache lines).
template <typename T>
inline void store(T* dst, const float* v, int n);
template <>
inline void store<float>(float* dst, const float* v, int n) {
  int i = 0;
#if defined(__AVX__)
  if (((uintptr_t)dst & 31) == 0) {
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(v + i));
  }
#endif
  for (; i < n; ++i) dst[i] = v[i];
}
template <>
inline void store<uint16_t>(uint16_t* dst, const float* v, int n) {
  int i = 0;
#if defined(__F16C__) && defined(__AVX__)
  if (((uintptr_t)dst & 15) == 0)
    for (; i + 8 <= n; i += 8)
      _mm_stream_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), 0));
  for (; i + 4 <= n; i += 4) _mm_storel_epi64((__m128i*)(dst + i), _mm_cvtps_ph(_mm_loadu_ps(v + i), 0));
#endif
  for (; i < n; ++i) dst[i] = fl::float_to_half(v[i]);
}
template <>
inline void store<uint8_t>(uint8_t* dst, const float* v, int n) {
  fl::store_u8(v, dst, n);
}

inline void load_norm(const uint8_t* __restrict src, float sc, float bi, float* __restrict v, int n) {
  for (int x = 0; x < n; ++x) v[x] = src[x] * sc + bi;
}

// The last pass: normalize, erase, mix, convert; one output row (all channels) at a time.
// img is interleaved HWC when STEP == 3 (after RandAugment: each row is de-interleaved once
// into a small buffer), else row-planar; the partner image is always row-planar.
template <typename T, int STEP>
void finish(const Job& J, const Aug& a, const fl::ExtView& e, const uint8_t* img, const uint8_t* pimg, T* out,
            TLS& t) {
  const int oh = J.oh, ow = J.ow;
  const bool norm = J.dtype != kU8;
  const bool black = e.ext & fl::kExtEraseBlack;
  int et = 0, el = 0, eh = 0, ew = 0;
  const bool erase = a.erase[3] != 0;
  if (erase) fl::box_to_pixels(a.erase, oh, ow, &et, &el, &eh, &ew);
  int pt = 0, pl = 0, ph = 0, pw = 0;
  const bool perase = pimg && (e.ext & fl::kExtPartnerAug) && e.perase[3] != 0;
  if (perase) fl::box_to_pixels(e.perase, oh, ow, &pt, &pl, &ph, &pw);
  const bool mix = pimg && (a.flags & fl::kFlagMixup);
  const bool cut = pimg && (a.flags & fl::kFlagCutmix);
  const float lam = mix ? (float)a.mixup / (float)fl::kQ : 1.f;
  const float lam1 = 1.f - lam;
  int ct = 0, cl = 0, ch = 0, cw = 0;
  if (cut) fl::box_to_pixels(a.cutmix, oh, ow, &ct, &cl, &ch, &cw);
  if (t.row.size() < (size_t)ow) t.row.resize(ow);
  if (t.prow.size() < (size_t)ow) t.prow.resize(ow);
  if (STEP == 3 && t.deint.size() < (size_t)ow * 3) t.deint.resize((size_t)ow * 3);
  float* __restrict v = t.row.data();
  float* __restrict p = t.prow.data();
  uint8_t* dq = t.deint.data();
  for (int y = 0; y < oh; ++y) {
    const uint8_t* rowp;  // row-planar row y: R, G, B runs of ow
    if (STEP == 3) {
      hwc_to_planar(img + (size_t)y * ow * 3, dq, dq + ow, dq + 2 * ow, ow);
      rowp = dq;
    } else {
      rowp = img + (size_t)y * 3 * ow;
    }
    const bool in_cut = cut && y >= ct && y < ct + ch;
    const bool in_erase = erase && y >= et && y < et + eh;
    const bool in_perase = perase && y >= pt && y < pt + ph;
    for (int c = 0; c < 3; ++c) {
      const float sc = norm ? J.scale[c] : 1.f, bi = norm ? J.bias[c] : 0.f;
      const float fill = erase_fill(J, c, black);
      load_norm(rowp + (size_t)c * ow, sc, bi, v, ow);
      if (in_erase)
        for (int x = el; x < el + ew; ++x) v[x] = fill;
      if (mix || in_cut) {
        load_norm(pimg + ((size_t)y * 3 + c) * ow, sc, bi, p, ow);
        if (in_perase)
          for (int x = pl; x < pl + pw; ++x) p[x] = fill;
        if (mix)
          for (int x = 0; x < ow; ++x) v[x] = lam * v[x] + lam1 * p[x];
        if (in_cut)
          for (int x = cl; x < cl + cw; ++x) v[x] = p[x];
      }
      store<T>(out + (size_t)c * oh * ow + (size_t)y * ow, v, ow);
    }
  }
#if defined(__SSE2__)
  _mm_sfence();  // order the non-temporal stores before anything that follows
#endif
}

template <int STEP>
void finish_any(const Job& J, const Aug& a, const fl::ExtView& e, const uint8_t* img, const uint8_t* pimg, long i,
                TLS& t) {
  const size_t plane = (size_t)3 * J.oh * J.ow;
  switch (J.dtype) {
    case kF32:
      finish<float, STEP>(J, a, e, img, pimg, (float*)J.out + i * plane, t);
      break;
    case kF16:
      finish<uint16_t, STEP>(J, a, e, img, pimg, (uint16_t*)J.out + i * plane, t);
      break;
    default:
      finish<uint8_t, STEP>(J, a, e, img, pimg, (uint8_t*)J.out + i * plane, t);
  }
}

// RandAugment on a row-planar render (ops work on interleaved HWC): bins, or the stored
// float magnitudes of an extension record. hwc/ra: scratch of oh*ow*3 bytes.
int ra_planar(const Job& J, uint8_t* planar, uint8_t* hwc, uint8_t* ra, const uint8_t* ops, const int8_t* mags,
              const float* vals, bool use_vals, bool back_to_planar) {
  const int ow = J.ow;
  for (int y = 0; y < J.oh; ++y) {
    const uint8_t* r = planar + (size_t)y * 3 * ow;
    planar_to_hwc(r, r + ow, r + 2 * ow, hwc + (size_t)y * 3 * ow, ow);
  }
  int rc;
  if (J.timm) {
    if (!use_vals) return fl::fail("timm RandAugment records need their levels (extension records with ra_float)");
    if (&fl::ra_timm_apply == nullptr) return fl::fail("RandAugment is not built into this library");
    rc = fl::ra_timm_apply(hwc, J.oh, J.ow, ops, mags, vals, fl::kMaxRA, J.fill, ra);
  } else if (use_vals) {
    if (&fl::randaugment_apply_values == nullptr) return fl::fail("RandAugment is not built into this library");
    rc = fl::randaugment_apply_values(hwc, J.oh, J.ow, ops, vals, fl::kMaxRA, J.grid_h, J.grid_w, ra,
                                      J.num_bins & fl::kRASemanticsMask);
  } else {
    if (&fl::randaugment_apply == nullptr) return fl::fail("RandAugment is not built into this library");
    rc = fl::randaugment_apply(hwc, J.oh, J.ow, ops, mags, fl::kMaxRA, J.num_bins, ra);
  }
  if (rc || !back_to_planar) return rc;
  for (int y = 0; y < J.oh; ++y) {
    uint8_t* r = planar + (size_t)y * 3 * ow;
    hwc_to_planar(hwc + (size_t)y * 3 * ow, r, r + ow, r + 2 * ow, ow);
  }
  return 0;
}

// Fast path (no RandAugment, no mixing): the resize writes normalized rows straight into
// the output; erasing then overwrites its box.
int render_direct(const Job& J, const Aug& a, bool black, long i, TLS& t) {
  const int oh = J.oh, ow = J.ow;
  const size_t plane = (size_t)oh * ow;
  const size_t esz = J.dtype == kF32 ? 4 : (J.dtype == kF16 ? 2 : 1);
  uint8_t* base = (uint8_t*)J.out + (size_t)i * 3 * plane * esz;
  const bool norm = J.dtype != kU8;
  fl::DirectOut D;
  D.dtype = J.dtype;
  for (int c = 0; c < 3; ++c) {
    D.planes[c] = base + c * plane * esz;
    D.scale[c] = norm ? J.scale[c] : 1.f;
    D.bias[c] = norm ? J.bias[c] : 0.f;
  }
  t.s.direct = &D;
  int rc = fl::render_u8(J.srcs[i], a.crop, a.flags & fl::kFlagFlip, oh, ow, J.bicubic, J.dct, J.resize, t.s, nullptr);
  t.s.direct = nullptr;
#if defined(__SSE2__)
  _mm_sfence();  // order the non-temporal stores before anything that follows
#endif
  if (rc) return rc;
  if (a.erase[3] != 0) {
    int et, el, eh, ew;
    fl::box_to_pixels(a.erase, oh, ow, &et, &el, &eh, &ew);
    for (int c = 0; c < 3; ++c) {
      const float fill = erase_fill(J, c, black);
      for (int y = et; y < et + eh; ++y) {
        const size_t off = (size_t)c * plane + (size_t)y * ow + el;
        if (J.dtype == kF32)
          for (int x = 0; x < ew; ++x) ((float*)base)[off + x] = fill;
        else if (J.dtype == kF16)
          for (int x = 0; x < ew; ++x) ((uint16_t*)base)[off + x] = fl::float_to_half(fill);
        else
          for (int x = 0; x < ew; ++x) base[off + x] = (uint8_t)std::nearbyint(std::min(255.f, std::max(0.f, fill)));
      }
    }
  }
  return 0;
}

int render_one(const Job& J, long i) {
  TLS& t = tls();
  const Aug& a = J.augs[i];
  const size_t n = (size_t)J.oh * J.ow * 3;
  if (t.img.size() < n) t.img.resize(n);
  fl::ExtView e{};
  for (int k = 0; k < fl::kMaxRA; ++k) e.pra_ops[k] = fl::kRANone;
  if (J.ext) fl::load_ext(J.ext + i, &e);
  const bool vals = e.ext & fl::kExtRaFloat;
  bool has_ra = false, p_ra = false;
  for (int k = 0; k < fl::kMaxRA; ++k) has_ra |= a.ra_ops[k] != fl::kRANone;
  if (e.ext & fl::kExtPartnerAug)
    for (int k = 0; k < fl::kMaxRA; ++k) p_ra |= e.pra_ops[k] != fl::kRANone;
  const bool mixing = a.flags & (fl::kFlagMixup | fl::kFlagCutmix);
  if (!has_ra && !mixing) return render_direct(J, a, e.ext & fl::kExtEraseBlack, i, t);
  t.s.direct = nullptr;
  int rc = fl::render_u8(J.srcs[i], a.crop, a.flags & fl::kFlagFlip, J.oh, J.ow, J.bicubic, J.dct, J.resize, t.s,
                         t.img.data());
  if (rc) return rc;
  if (has_ra || p_ra) {
    if (t.hwc.size() < n) t.hwc.resize(n);
    if (t.ra.size() < n) t.ra.resize(n);
  }
  if (has_ra) {
    // the result stays interleaved in t.hwc (finish<3> de-interleaves row by row)
    rc = ra_planar(J, t.img.data(), t.hwc.data(), t.ra.data(), a.ra_ops, a.ra_mags, e.ra_vals, vals, false);
    if (rc) return rc;
  }
  const uint8_t* pimg = nullptr;
  if (a.flags & (fl::kFlagMixup | fl::kFlagCutmix)) {
    if (J.partners == nullptr || J.partners[i].data == nullptr)
      return fl::fail("the record mixes with partner %d but no partner source was given", a.partner);
    if (t.pimg.size() < n) t.pimg.resize(n);
    // CutMix without MixUp reads only the partner rows inside the box: render (and decode)
    // just those; the rows' pixels are the same as in a full render.
    if (!(a.flags & fl::kFlagMixup) && !p_ra) {  // the partner's RandAugment moves pixels across rows
      int ct, cl, ch, cw;
      fl::box_to_pixels(a.cutmix, J.oh, J.ow, &ct, &cl, &ch, &cw);
      t.s.win_y0 = ct;
      t.s.win_y1 = ct + ch;
    }
    rc = fl::render_u8(J.partners[i], a.pcrop, a.flags & fl::kFlagPartnerFlip, J.oh, J.ow, J.bicubic, J.dct,
                       J.resize, t.s, t.pimg.data());
    t.s.win_y0 = t.s.win_y1 = 0;
    if (rc) {
      std::string m = fl::error_buffer();
      return fl::fail("partner %d: %s", a.partner, m.c_str());
    }
    if (p_ra) {
      if (t.phwc.size() < n) t.phwc.resize(n);
      rc = ra_planar(J, t.pimg.data(), t.phwc.data(), t.ra.data(), e.pra_ops, e.pra_mags, e.pra_vals, vals, true);
      if (rc) {
        std::string m = fl::error_buffer();
        return fl::fail("partner %d: %s", a.partner, m.c_str());
      }
    }
    pimg = t.pimg.data();
  }
  if (has_ra)
    finish_any<3>(J, a, e, t.hwc.data(), pimg, i, t);
  else
    finish_any<1>(J, a, e, t.img.data(), pimg, i, t);
  return 0;
}

// Runs fn(i) for i in [0, n) on the pool and keeps the first failure (lowest index).
template <typename F>
int run_batch(long n, int threads, int64_t* bad_index, F fn) {
  std::mutex mu;
  long bad = -1;
  std::string msg;
  if (threads <= 0) threads = fl::default_threads();
  const int prc = fl::parallel_for(n, threads, 1, [&](long b, long e, int) {
    for (long i = b; i < e; ++i) {
      // A C++ exception (bad_alloc of a scratch buffer) is this sample's error.
      const int rc = fl::guard("render", [&] { return fn(i); });
      if (rc) {
        std::lock_guard<std::mutex> lk(mu);
        if (bad < 0 || i < bad) {
          bad = i;
          msg = fl::error_buffer();
        }
      }
    }
  });
  if (prc) return prc;  // the pool failed (not a sample): message already set
  if (bad_index) *bad_index = bad;
  if (bad >= 0) return fl::fail("sample %ld: %s", bad, msg.c_str());
  return 0;
}

}  // namespace

FL_EXPORT int fl_replay_have_jpeg() {
#ifdef FASTLOAD_HAVE_JPEG
  return 1;
#else
  return 0;
#endif
}

FL_EXPORT int fl_replay_have_randaugment() { return &fl::randaugment_apply != nullptr ? 1 : 0; }

// The layout hash of record kind `kind` (fl_aug.h, k<Name>Kind) this library was built with;
// 0 for an unknown kind. fastload.replay.native compares every kind with the schema's.
FL_EXPORT uint64_t fl_replay_layout_hash(int kind) {
  switch (kind) {
    case fl::kAugKind: return fl::kAugLayoutHash;
    case fl::kAugExtKind: return fl::kAugExtLayoutHash;
    case fl::kReplayOptionsKind: return fl::kReplayOptionsLayoutHash;
    default: return 0;
  }
}

// JPEG decode limits (csrc/replay/jpeg.cpp, check_limits): max_pixels, max_bytes (values
// <= 0 keep the current one), max_pixels_per_byte (0 = off), free_pixels (values < 0 keep).
FL_EXPORT int fl_replay_set_limits(int64_t max_pixels, int64_t max_bytes, int64_t max_pixels_per_byte,
                                   int64_t free_pixels) {
#ifdef FASTLOAD_HAVE_JPEG
  fl::set_jpeg_limits(max_pixels, max_bytes, max_pixels_per_byte, free_pixels);
#else
  (void)max_pixels; (void)max_bytes; (void)max_pixels_per_byte; (void)free_pixels;
#endif
  return 0;
}

// v: cap >= 4 int64 (the four limits, in set order).
FL_EXPORT int fl_replay_get_limits(int64_t* v, int64_t cap) {
  if (v == nullptr || cap < 4) return fl::fail("fl_replay_get_limits: need 4 values");
#ifdef FASTLOAD_HAVE_JPEG
  fl::get_jpeg_limits(v);
  return 0;
#else
  return fl::fail("built without libjpeg");
#endif
}

// Lossless restart-marker transcode (jpeg.cpp, jpeg_add_restarts): 0, 1 (not applicable) or -1.
FL_EXPORT int fl_jpeg_add_restarts(const uint8_t* data, int64_t len, uint8_t* out, int64_t cap, int64_t* out_len) {
  return fl::guard("fl_jpeg_add_restarts", [&]() -> int {
#ifdef FASTLOAD_HAVE_JPEG
    if (len < 0) return fl::fail("fl_jpeg_add_restarts: negative length");
    return fl::jpeg_add_restarts(data, (size_t)len, out, cap, out_len);
#else
    (void)data; (void)len; (void)out; (void)cap; (void)out_len;
    return 1;
#endif
  });
}

FL_EXPORT int64_t fl_jpeg_slice_count() {
#ifdef FASTLOAD_HAVE_JPEG
  return fl::jpeg_slice_count();
#else
  return 0;
#endif
}

// Test hook (fastload/replay/testing.py): libjpeg's encoder with its own options.
FL_EXPORT int fl_jpeg_encode_test(const uint8_t* px, int h, int w, int components, int quality, int progressive,
                                  int arith, int subsample, uint8_t* out, int64_t cap, int64_t* out_len) {
  return fl::guard("fl_jpeg_encode_test", [&]() -> int {
#ifdef FASTLOAD_HAVE_JPEG
    return fl::jpeg_encode_test(px, h, w, components, quality, progressive, arith, subsample, out, cap, out_len);
#else
    (void)px; (void)h; (void)w; (void)components; (void)quality; (void)progressive; (void)arith;
    (void)subsample; (void)out; (void)cap; (void)out_len;
    return fl::fail("built without libjpeg");
#endif
  });
}

// The resize weights of one axis, for tests against a NumPy reference. sizes[0..2] = K (row
// stride of w), taps (every output's count after padding; 0: counts differ), KP (int16
// pairs per output; 0: no int16 tables). Buffers may be null (size query); otherwise caps[k]
// is the capacity in elements of w, start, count, wpair, wvec (k = 0..4): w needs out*K
// floats, start/count out ints, wpair out*KP, wvec (out/8)*4*KP*8 int32. A buffer too small
// for what this axis needs fails without writing.
FL_EXPORT int fl_replay_axis_weights(int out, double x0, double len, int lo, int hi, int bicubic, int int16,
                                     int* sizes, float* w, int* start, int* count, int32_t* wpair,
                                     int32_t* wvec, const int64_t* caps) {
  return fl::guard("fl_replay_axis_weights", [&]() -> int {
  if (out <= 0 || hi <= lo || len <= 0) return fl::fail("axis weights: bad axis out=%d lo=%d hi=%d", out, lo, hi);
  if (sizes == nullptr) return fl::fail("axis weights: null sizes");
  fl::AxisWeights aw;
  fl::compute_axis_weights(out, x0, len, lo, hi, bicubic != 0, aw, int16 != 0);
  sizes[0] = aw.K;
  sizes[1] = aw.taps;
  sizes[2] = aw.wpair.empty() ? 0 : aw.KP;
  const void* bufs[5] = {w, start, count, wpair, wvec};
  const size_t need[5] = {aw.w.size(), (size_t)out, (size_t)out, aw.wpair.size(), aw.wvec.size()};
  for (int k = 0; k < 5; ++k)
    if (bufs[k] && (caps == nullptr || caps[k] < 0 || (size_t)caps[k] < need[k]))
      return fl::fail("axis weights: buffer %d holds %lld elements, %zu needed", k,
                      caps ? (long long)caps[k] : -1LL, need[k]);
  if (w) std::memcpy(w, aw.w.data(), sizeof(float) * aw.w.size());
  if (start) std::memcpy(start, aw.start.data(), sizeof(int) * (size_t)out);
  if (count) std::memcpy(count, aw.count.data(), sizeof(int) * (size_t)out);
  if (wpair && !aw.wpair.empty()) std::memcpy(wpair, aw.wpair.data(), sizeof(int32_t) * aw.wpair.size());
  if (wvec && !aw.wvec.empty()) std::memcpy(wvec, aw.wvec.data(), sizeof(int32_t) * aw.wvec.size());
  return 0;
  });
}

// srcs/partners: n Source descriptors (partners may be null; entries with data == null are
// "none"); augs: n packed records; ext: n packed extension records or null; out: n x 3 x
// out_h x out_w of opt->dtype, opt->out_bytes its capacity. Everything else is in the
// options struct (fl_aug.h, generated from fastload/sample/schema.py).
namespace {

// Checks the options and fills the job; 0, or -1 with the message set.
int make_job(const Source* srcs, const Source* partners, const Aug* augs, const fl::AugExt* ext, int64_t n,
                    void* out, const fl::ReplayOptions* opt, Job* job) {
  if (!opt) return fl::fail("null options");
  const fl::ReplayOptions& o = *opt;
  if (n < 0 || (n > 0 && (!srcs || !augs || !out))) return fl::fail("null argument");
  if (o.out_h <= 0 || o.out_w <= 0) return fl::fail("output size must be positive, got %dx%d", o.out_h, o.out_w);
  if (o.dtype < 0 || o.dtype > 2) return fl::fail("unknown output dtype code %d", o.dtype);
  if (o.interpolation < 0 || o.interpolation > 1) return fl::fail("unknown interpolation code %d", o.interpolation);
  if (o.dct_rule < fl::kDctOff || o.dct_rule > fl::kDctM8) return fl::fail("unknown DCT rule %d", o.dct_rule);
  if (o.resize < 0 || o.resize >= fl::kResizeModes) return fl::fail("unknown resize mode %d", o.resize);
  if (o.decoder_flags & ~3) return fl::fail("unknown decoder flags %#x", o.decoder_flags);
  if (!fl::ra_semantics_known(o.ra_semantics))
    return fl::fail("unknown RandAugment semantics %d", o.ra_semantics);
  if (o.ra_num_bins < 2 || o.ra_num_bins > 128) return fl::fail("ra_num_bins %d outside [2, 128]", o.ra_num_bins);
  if (o.grid_h < 0 || o.grid_w < 0) return fl::fail("box grid must be non-negative, got %dx%d", o.grid_h, o.grid_w);
  const int64_t esz = o.dtype == kF32 ? 4 : (o.dtype == kF16 ? 2 : 1);
  if ((double)n * 3 * o.out_h * o.out_w * esz > (double)o.out_bytes)
    return fl::fail("output buffer of %lld bytes is too small for %lld x 3 x %d x %d", (long long)o.out_bytes,
                    (long long)n, o.out_h, o.out_w);
  const int dct = o.dct_rule | ((o.decoder_flags & 1) ? fl::kDctIfast : 0) |
                  ((o.decoder_flags & 2) ? fl::kDctNoFancy : 0);
  // randaugment_apply takes the semantics in num_bins' kRASemanticsV2/PIL bits (internal)
  const int num_bins = o.ra_num_bins | (o.ra_semantics == fl::kRASemV2 ? fl::kRASemanticsV2
                                         : o.ra_semantics == fl::kRASemPil ? fl::kRASemanticsPIL : 0);
  Job J{srcs, partners, augs, out, o.dtype, o.out_h, o.out_w, o.interpolation, dct, num_bins, {}, {}, {}};
  J.ext = ext;
  J.grid_h = o.grid_h > 0 ? o.grid_h : o.out_h;
  J.grid_w = o.grid_w > 0 ? o.grid_w : o.out_w;
  J.timm = o.ra_semantics == fl::kRASemTimm;
  J.resize = o.resize;
  for (int c = 0; c < 3; ++c) {
    if (o.ra_fill[c] < 0 || o.ra_fill[c] > 255) return fl::fail("ra_fill[%d] %d outside [0, 255]", c, o.ra_fill[c]);
    J.fill[c] = (uint8_t)o.ra_fill[c];
  }
  for (int c = 0; c < 3; ++c) {
    if (!(o.std[c] > 0.f)) return fl::fail("std[%d] must be positive", c);
    J.scale[c] = 1.f / (255.f * o.std[c]);
    J.bias[c] = -o.mean[c] / o.std[c];
    J.mean255[c] = o.mean[c] * 255.f;
  }
  *job = J;
  return 0;
}

// Asynchronous batches (fl_replay_submit / fl_replay_wait). Why: between two synchronous
// calls the pool idles while the calling Python thread waits for the GIL (up to the
// interpreter's 5 ms switch interval when another thread runs Python) and prepares the next
// call; a queue of submitted batches keeps the pool busy across that gap. One runner thread
// per process takes the batches in submission order and renders each with the pool exactly
// as fl_replay does (the runner is the calling thread of run_batch). The runner is created
// on first use and detached: the process may exit at any moment, and after fork() the child
// gets a fresh queue (the parent's runner does not exist there).
class Runner {
 public:
  struct Ticket {
    Job job;
    int64_t n = 0;
    int threads = 0;
    bool done = false;
    int rc = 0;
    int64_t bad = -1;
    std::string msg;
  };

  static Runner& instance() {
    static std::mutex mu;
    static Runner* r = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(mu);
    const pid_t me = getpid();
    if (r == nullptr || owner != me) {
      r = new Runner();  // never destroyed (see above); a child leaks its parent's on purpose
      owner = me;
    }
    return *r;
  }

  int64_t submit(const Job& J, int64_t n, int threads) {
    auto t = std::make_unique<Ticket>();
    t->job = J;
    t->n = n;
    t->threads = threads;
    std::lock_guard<std::mutex> lk(mu_);
    if (!started_) {
      std::thread([this] { loop(); }).detach();
      started_ = true;
    }
    const int64_t id = next_id_++;
    queue_.push_back(t.get());
    tickets_.emplace(id, std::move(t));
    cv_.notify_all();
    return id;
  }

  // Waits for ticket `id`; its status, with its message set for the calling thread.
  int wait(int64_t id, int64_t* bad_index) {
    std::unique_ptr<Ticket> t;
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto it = tickets_.find(id);
      if (it == tickets_.end()) return fl::fail("fl_replay_wait: unknown or already waited ticket %lld", (long long)id);
      Ticket* p = it->second.get();
      done_cv_.wait(lk, [&] { return p->done; });
      t = std::move(it->second);
      tickets_.erase(it);
    }
    if (bad_index) *bad_index = t->bad;
    if (t->rc) return fl::fail("%s", t->msg.c_str());
    return 0;
  }

  int pending() {
    std::lock_guard<std::mutex> lk(mu_);
    return (int)tickets_.size();
  }

 private:
  void loop() {
    for (;;) {
      Ticket* t;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty(); });
        t = queue_.front();
        queue_.pop_front();
      }
      int64_t bad = -1;
      const Job& J = t->job;
      const int rc = fl::guard("fl_replay", [&] {
        return run_batch((long)t->n, t->threads, &bad, [&](long i) { return render_one(J, i); });
      });
      std::lock_guard<std::mutex> lk(mu_);
      t->rc = rc;
      t->bad = bad;
      if (rc) t->msg = fl::error_buffer();
      t->done = true;
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Ticket*> queue_;
  std::unordered_map<int64_t, std::unique_ptr<Ticket>> tickets_;
  int64_t next_id_ = 1;
  bool started_ = false;
};

}  // namespace

// srcs/partners: n Source descriptors (partners may be null; entries with data == null are
// "none"); augs: n packed records; ext: n packed extension records or null; out: n x 3 x
// out_h x out_w of opt->dtype, opt->out_bytes its capacity. Everything else is in the
// options struct (fl_aug.h, generated from fastload/sample/schema.py).
FL_EXPORT int fl_replay(const Source* srcs, const Source* partners, const Aug* augs, const fl::AugExt* ext,
                        int64_t n, void* out, const fl::ReplayOptions* opt, int64_t* bad_index) {
  return fl::guard("fl_replay", [&]() -> int {
    if (bad_index) *bad_index = -1;
    Job J{};
    if (make_job(srcs, partners, augs, ext, n, out, opt, &J)) return -1;
    return run_batch((long)n, opt->threads, bad_index, [&](long i) { return render_one(J, i); });
  });
}

// fl_replay, queued: checks the arguments now (-1 with the message set), else returns a
// ticket (> 0) for fl_replay_wait. Every buffer the arguments point to (sources, records,
// options excepted: they are copied now, output) must stay alive until that wait returns.
FL_EXPORT int64_t fl_replay_submit(const Source* srcs, const Source* partners, const Aug* augs,
                                   const fl::AugExt* ext, int64_t n, void* out, const fl::ReplayOptions* opt) {
  int64_t id = -1;
  const int rc = fl::guard("fl_replay_submit", [&]() -> int {
    Job J{};
    if (make_job(srcs, partners, augs, ext, n, out, opt, &J)) return -1;
    id = Runner::instance().submit(J, n, opt->threads);
    return 0;
  });
  return rc ? -1 : id;
}

// Waits for a submitted batch: fl_replay's status, bad_index and message. Each ticket is
// waited once.
FL_EXPORT int fl_replay_wait(int64_t ticket, int64_t* bad_index) {
  return fl::guard("fl_replay_wait", [&]() -> int {
    if (bad_index) *bad_index = -1;
    return Runner::instance().wait(ticket, bad_index);
  });
}

// Test hook: tickets submitted and not yet waited.
FL_EXPORT int fl_replay_pending() { return Runner::instance().pending(); }

// Source height/width of each JPEG (header only) into hw[2*i], hw[2*i+1] (hw_cap int32),
// at scale 1/denom.
FL_EXPORT int fl_jpeg_dims_batch(const Source* srcs, int64_t n, int denom, int32_t* hw, int64_t hw_cap, int threads,
                                 int64_t* bad_index) {
  return fl::guard("fl_jpeg_dims_batch", [&]() -> int {
  if (bad_index) *bad_index = -1;
  if (denom != 1 && denom != 2 && denom != 4 && denom != 8) return fl::fail("scale denominator must be 1, 2, 4 or 8");
  if (n < 0 || (n > 0 && (!srcs || !hw))) return fl::fail("null argument");
  if (hw_cap < 2 * n) return fl::fail("dims buffer of %lld values is too small for %lld images", (long long)hw_cap,
                                      (long long)n);
#ifdef FASTLOAD_HAVE_JPEG
  return run_batch((long)n, threads, bad_index, [&](long i) {
    int h = 0, w = 0;
    int rc = fl::jpeg_scaled_dims(srcs[i].data, (size_t)srcs[i].len, denom, &h, &w);
    hw[2 * i] = h;
    hw[2 * i + 1] = w;
    return rc;
  });
#else
  (void)threads;
  return fl::fail("built without libjpeg");
#endif
  });
}

// The decode floor of each sample's crop (crops: n x 4 quantized boxes, as the stored
// augmentations; fl::jpeg_crop_floor): regions[4*i..] receives the decoded region (y0, x0, h,
// w) in scaled pixels; its pixels go to outs[i] (out_caps[i] bytes) or, when outs is null, to
// per-thread scratch that is discarded (the benchmark's floor pipeline).
FL_EXPORT int fl_crop_floor_batch(const Source* srcs, const uint16_t* crops, int64_t n, int oh, int ow, int dct_rule,
                                  uint8_t* const* outs, const int64_t* out_caps, int32_t* regions, int threads,
                                  int64_t* bad_index) {
  return fl::guard("fl_crop_floor_batch", [&]() -> int {
  if (bad_index) *bad_index = -1;
  if (n < 0 || (n > 0 && (!srcs || !crops || !regions))) return fl::fail("null argument");
  if (outs && !out_caps) return fl::fail("output buffers given without their capacities");
  if (oh <= 0 || ow <= 0) return fl::fail("output size must be positive, got %dx%d", oh, ow);
  if (dct_rule < fl::kDctOff || dct_rule > fl::kDctM8) return fl::fail("unknown DCT rule %d", dct_rule);
#ifdef FASTLOAD_HAVE_JPEG
  return run_batch((long)n, threads, bad_index, [&](long i) {
    return fl::jpeg_crop_floor(srcs[i].data, (size_t)srcs[i].len, crops + 4 * i, oh, ow, dct_rule,
                               tls().s, outs ? outs[i] : nullptr, outs ? out_caps[i] : 0, regions + 4 * i);
  });
#else
  (void)threads;
  (void)outs;
  return fl::fail("built without libjpeg");
#endif
  });
}

// Full decode at scale 1/denom: into outs[i], a buffer of out_caps[i] bytes (sized from
// fl_jpeg_dims_batch; an image that needs more fails without writing), or, when outs is
// null, into per-thread scratch that is discarded (the benchmark's decode-only limit).
FL_EXPORT int fl_decode_batch(const Source* srcs, int64_t n, int denom, uint8_t* const* outs,
                              const int64_t* out_caps, int threads, int64_t* bad_index) {
  return fl::guard("fl_decode_batch", [&]() -> int {
  if (bad_index) *bad_index = -1;
  if (denom != 1 && denom != 2 && denom != 4 && denom != 8) return fl::fail("scale denominator must be 1, 2, 4 or 8");
  if (n < 0 || (n > 0 && !srcs)) return fl::fail("null argument");
  if (outs && !out_caps) return fl::fail("output buffers given without their capacities");
#ifdef FASTLOAD_HAVE_JPEG
  return run_batch((long)n, threads, bad_index, [&](long i) {
    int h, w;
    return fl::jpeg_decode_full(srcs[i].data, (size_t)srcs[i].len, denom, outs ? outs[i] : nullptr,
                                outs ? out_caps[i] : 0, tls().s, &h, &w);
  });
#else
  (void)threads;
  return fl::fail("built without libjpeg");
#endif
  });
}
