// The fused replay kernel's C entry points: a batch of (source, stored augmentation record)
// -> crop -> antialiased resize -> flip -> RandAugment -> normalize -> erase -> MixUp ->
// CutMix, written NCHW straight into the caller's (pinned) output, one sample per task on
// the shared thread pool. Errors are per sample: the first failing position is returned
// with its message; a bad sample never takes the process down.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>

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
};

struct TLS {
  Scratch s;
  std::vector<uint8_t> img, pimg, hwc, ra;
  std::vector<float> row, prow;
};

TLS& tls() {
  static thread_local TLS t;
  return t;
}

template <typename T>
inline void store(T* dst, const float* v, int n);
template <>
inline void store<float>(float* dst, const float* v, int n) {
  std::memcpy(dst, v, sizeof(float) * n);
}
template <>
inline void store<uint16_t>(uint16_t* dst, const float* v, int n) {
  int i = 0;
#if defined(__F16C__)
  for (; i + 4 <= n; i += 4) _mm_storel_epi64((__m128i*)(dst + i), _mm_cvtps_ph(_mm_loadu_ps(v + i), 0));
#endif
  for (; i < n; ++i) dst[i] = fl::float_to_half(v[i]);
}
template <>
inline void store<uint8_t>(uint8_t* dst, const float* v, int n) {
  fl::store_u8(v, dst, n);
}

// Channel c of row y of a rendered image: row-planar (step 1) or interleaved HWC (step 3).
template <int STEP>
inline const uint8_t* chan_row(const uint8_t* img, int y, int c, int ow) {
  return STEP == 1 ? img + ((size_t)y * 3 + c) * ow : img + (size_t)y * ow * 3 + c;
}

template <int STEP>
inline void load_norm(const uint8_t* src, float sc, float bi, float* v, int n) {
  for (int x = 0; x < n; ++x) v[x] = src[x * STEP] * sc + bi;
}

// The last pass: normalize, erase, mix, convert; one output row of one channel at a time.
// img is interleaved HWC when STEP == 3 (after RandAugment), else row-planar; the partner
// image is always row-planar.
template <typename T, int STEP>
void finish(const Job& J, const Aug& a, const uint8_t* img, const uint8_t* pimg, T* out, TLS& t) {
  const int oh = J.oh, ow = J.ow;
  const bool norm = J.dtype != kU8;
  int et = 0, el = 0, eh = 0, ew = 0;
  const bool erase = a.erase[3] != 0;
  if (erase) fl::box_to_pixels(a.erase, oh, ow, &et, &el, &eh, &ew);
  const bool mix = pimg && (a.flags & fl::kFlagMixup);
  const bool cut = pimg && (a.flags & fl::kFlagCutmix);
  const float lam = mix ? (float)a.mixup / (float)fl::kQ : 1.f;
  const float lam1 = 1.f - lam;
  int ct = 0, cl = 0, ch = 0, cw = 0;
  if (cut) fl::box_to_pixels(a.cutmix, oh, ow, &ct, &cl, &ch, &cw);
  if (t.row.size() < (size_t)ow) t.row.resize(ow);
  if (t.prow.size() < (size_t)ow) t.prow.resize(ow);
  float* v = t.row.data();
  float* p = t.prow.data();
  for (int c = 0; c < 3; ++c) {
    const float sc = norm ? J.scale[c] : 1.f, bi = norm ? J.bias[c] : 0.f;
    const float fill = norm ? 0.f : J.mean255[c];
    T* plane = out + (size_t)c * oh * ow;
    for (int y = 0; y < oh; ++y) {
      load_norm<STEP>(chan_row<STEP>(img, y, c, ow), sc, bi, v, ow);
      if (erase && y >= et && y < et + eh)
        for (int x = el; x < el + ew; ++x) v[x] = fill;
      if (pimg && (mix || (cut && y >= ct && y < ct + ch))) {
        load_norm<1>(chan_row<1>(pimg, y, c, ow), sc, bi, p, ow);
        if (mix)
          for (int x = 0; x < ow; ++x) v[x] = lam * v[x] + lam1 * p[x];
        if (cut && y >= ct && y < ct + ch)
          for (int x = cl; x < cl + cw; ++x) v[x] = p[x];
      }
      store<T>(plane + (size_t)y * ow, v, ow);
    }
  }
}

template <int STEP>
void finish_any(const Job& J, const Aug& a, const uint8_t* img, const uint8_t* pimg, long i, TLS& t) {
  const size_t plane = (size_t)3 * J.oh * J.ow;
  switch (J.dtype) {
    case kF32:
      finish<float, STEP>(J, a, img, pimg, (float*)J.out + i * plane, t);
      break;
    case kF16:
      finish<uint16_t, STEP>(J, a, img, pimg, (uint16_t*)J.out + i * plane, t);
      break;
    default:
      finish<uint8_t, STEP>(J, a, img, pimg, (uint8_t*)J.out + i * plane, t);
  }
}

// Fast path (no RandAugment, no mixing): the resize writes normalized rows straight into
// the output; erasing then overwrites its box.
int render_direct(const Job& J, const Aug& a, long i, TLS& t) {
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
  int rc = fl::render_u8(J.srcs[i], a.crop, a.flags & fl::kFlagFlip, oh, ow, J.bicubic, J.dct, t.s, nullptr);
  t.s.direct = nullptr;
#if defined(__SSE2__)
  _mm_sfence();  // order the non-temporal stores before anything that follows
#endif
  if (rc) return rc;
  if (a.erase[3] != 0) {
    int et, el, eh, ew;
    fl::box_to_pixels(a.erase, oh, ow, &et, &el, &eh, &ew);
    for (int c = 0; c < 3; ++c) {
      const float fill = norm ? 0.f : J.mean255[c];
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
  bool has_ra = false;
  for (int k = 0; k < fl::kMaxRA; ++k) has_ra |= a.ra_ops[k] != fl::kRANone;
  const bool mixing = a.flags & (fl::kFlagMixup | fl::kFlagCutmix);
  if (!has_ra && !mixing) return render_direct(J, a, i, t);
  t.s.direct = nullptr;
  int rc = fl::render_u8(J.srcs[i], a.crop, a.flags & fl::kFlagFlip, J.oh, J.ow, J.bicubic, J.dct, t.s,
                         t.img.data());
  if (rc) return rc;
  if (has_ra) {
    if (&fl::randaugment_apply == nullptr) return fl::fail("RandAugment is not built into this library");
    // RandAugment works on interleaved HWC: interleave the row-planar render first.
    if (t.hwc.size() < n) t.hwc.resize(n);
    if (t.ra.size() < n) t.ra.resize(n);
    const int ow = J.ow;
    for (int y = 0; y < J.oh; ++y) {
      const uint8_t* r = t.img.data() + (size_t)y * 3 * ow;
      uint8_t* d = t.hwc.data() + (size_t)y * 3 * ow;
      for (int x = 0; x < ow; ++x) {
        d[3 * x] = r[x];
        d[3 * x + 1] = r[ow + x];
        d[3 * x + 2] = r[2 * ow + x];
      }
    }
    rc = fl::randaugment_apply(t.hwc.data(), J.oh, J.ow, a.ra_ops, a.ra_mags, fl::kMaxRA, J.num_bins,
                               t.ra.data());
    if (rc) return rc;
  }
  const uint8_t* pimg = nullptr;
  if (a.flags & (fl::kFlagMixup | fl::kFlagCutmix)) {
    if (J.partners == nullptr || J.partners[i].data == nullptr)
      return fl::fail("the record mixes with partner %d but no partner source was given", a.partner);
    if (t.pimg.size() < n) t.pimg.resize(n);
    rc = fl::render_u8(J.partners[i], a.pcrop, a.flags & fl::kFlagPartnerFlip, J.oh, J.ow, J.bicubic, J.dct,
                       t.s, t.pimg.data());
    if (rc) {
      std::string m = fl::error_buffer();
      return fl::fail("partner %d: %s", a.partner, m.c_str());
    }
    pimg = t.pimg.data();
  }
  if (has_ra)
    finish_any<3>(J, a, t.hwc.data(), pimg, i, t);
  else
    finish_any<1>(J, a, t.img.data(), pimg, i, t);
  return 0;
}

// Runs fn(i) for i in [0, n) on the pool and keeps the first failure (lowest index).
template <typename F>
int run_batch(long n, int threads, int64_t* bad_index, F fn) {
  std::mutex mu;
  long bad = -1;
  std::string msg;
  if (threads <= 0) threads = fl::default_threads();
  fl::parallel_for(n, threads, 1, [&](long b, long e, int) {
    for (long i = b; i < e; ++i) {
      int rc;
      try {
        rc = fn(i);
      } catch (const std::exception& ex) {
        rc = fl::fail("%s", ex.what());
      }
      if (rc) {
        std::lock_guard<std::mutex> lk(mu);
        if (bad < 0 || i < bad) {
          bad = i;
          msg = fl::error_buffer();
        }
      }
    }
  });
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

FL_EXPORT int fl_replay_record_size() { return (int)sizeof(fl::Aug); }

// srcs/partners: n Source descriptors (partners may be null); augs: n records; out: n x 3 x
// oh x ow of dtype (0 float32, 1 float16, 2 uint8 = no normalization); mean/std: 3 floats.
FL_EXPORT int fl_replay_batch(const Source* srcs, const Source* partners, const Aug* augs, int64_t n, void* out,
                              int dtype, int oh, int ow, const float* mean, const float* std, int bicubic,
                              int dct, int num_bins, int threads, int64_t* bad_index) {
  if (bad_index) *bad_index = -1;
  if (n < 0 || (n > 0 && (!srcs || !augs || !out))) return fl::fail("null argument");
  if (oh <= 0 || ow <= 0) return fl::fail("output size must be positive, got %dx%d", oh, ow);
  if (dtype < 0 || dtype > 2) return fl::fail("unknown output dtype code %d", dtype);
  Job J{srcs, partners, augs, out, dtype, oh, ow, bicubic, dct, num_bins, {}, {}, {}};
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.f)) return fl::fail("std[%d] must be positive", c);
    J.scale[c] = 1.f / (255.f * std[c]);
    J.bias[c] = -mean[c] / std[c];
    J.mean255[c] = mean[c] * 255.f;
  }
  return run_batch((long)n, threads, bad_index, [&](long i) { return render_one(J, i); });
}

// Source height/width of each JPEG (header only) into hw[2*i], hw[2*i+1], at scale 1/denom.
FL_EXPORT int fl_jpeg_dims_batch(const Source* srcs, int64_t n, int denom, int32_t* hw, int threads,
                                 int64_t* bad_index) {
  if (denom != 1 && denom != 2 && denom != 4 && denom != 8) return fl::fail("scale denominator must be 1, 2, 4 or 8");
#ifdef FASTLOAD_HAVE_JPEG
  return run_batch((long)n, threads, bad_index, [&](long i) {
    int h, w;
    int rc = fl::jpeg_scaled_dims(srcs[i].data, (size_t)srcs[i].len, denom, &h, &w);
    hw[2 * i] = h;
    hw[2 * i + 1] = w;
    return rc;
  });
#else
  (void)srcs; (void)n; (void)hw; (void)threads; (void)bad_index;
  return fl::fail("built without libjpeg");
#endif
}

// Full decode at scale 1/denom: into outs[i] (sized by fl_jpeg_dims_batch) or, when outs is
// null, into per-thread scratch that is discarded (the benchmark's decode-only limit).
FL_EXPORT int fl_decode_batch(const Source* srcs, int64_t n, int denom, uint8_t* const* outs, int threads,
                              int64_t* bad_index) {
  if (denom != 1 && denom != 2 && denom != 4 && denom != 8) return fl::fail("scale denominator must be 1, 2, 4 or 8");
#ifdef FASTLOAD_HAVE_JPEG
  return run_batch((long)n, threads, bad_index, [&](long i) {
    int h, w;
    return fl::jpeg_decode_full(srcs[i].data, (size_t)srcs[i].len, denom, outs ? outs[i] : nullptr, tls().s, &h,
                                &w);
  });
#else
  (void)srcs; (void)n; (void)outs; (void)threads; (void)bad_index;
  return fl::fail("built without libjpeg");
#endif
}
