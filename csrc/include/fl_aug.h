// The stored augmentation record, mirroring fastload/sample/params.py AUG_DTYPE (packed,
// 47 bytes). Read that file's docstring for the meaning of every field.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace fl {

constexpr uint32_t kQ = 65535;
constexpr int kMaxRA = 4;
constexpr uint8_t kRANone = 255;
constexpr uint8_t kFlagFlip = 1, kFlagPartnerFlip = 2, kFlagMixup = 4, kFlagCutmix = 8;

#pragma pack(push, 1)
struct Aug {
  uint16_t crop[4];  // top, left, height, width: fractions of the source, 1/65535 units
  uint8_t flags;
  uint8_t ra_ops[kMaxRA];
  int8_t ra_mags[kMaxRA];
  uint16_t erase[4];  // fractions of the output; width 0 = none
  int32_t partner;
  uint16_t pcrop[4];
  uint16_t mixup;
  uint16_t cutmix[4];  // fractions of the output
};
#pragma pack(pop)
static_assert(sizeof(Aug) == 47, "Aug must mirror AUG_DTYPE");

// Schema v2 extension record, mirroring params.py AUG_EXT_DTYPE (packed, 65 bytes): what
// imported ml-dr records need beyond Aug. Its float fields are unaligned: read them with
// memcpy (load_ext below), never through a float pointer.
constexpr uint8_t kExtRaFloat = 1, kExtEraseBlack = 2, kExtCutmixEmpty = 4, kExtPartnerAug = 8;

#pragma pack(push, 1)
struct AugExt {
  uint8_t ext;
  float ra_vals[kMaxRA];  // float magnitudes (kExtRaFloat); translations in box-grid pixels
  uint8_t pra_ops[kMaxRA];  // the partner's own RandAugment
  int8_t pra_mags[kMaxRA];
  float pra_vals[kMaxRA];
  uint16_t perase[4];  // the partner's own erase box, fractions of the output; width 0 = none
  double mixup_f;      // exact lambdas (informational: the kernels use Aug::mixup)
  double cutmix_lam;
};
#pragma pack(pop)
static_assert(sizeof(AugExt) == 65, "AugExt must mirror AUG_EXT_DTYPE");

// An aligned copy of one extension record (the packed one may sit at any address).
struct ExtView {
  uint8_t ext;
  float ra_vals[kMaxRA];
  uint8_t pra_ops[kMaxRA];
  int8_t pra_mags[kMaxRA];
  float pra_vals[kMaxRA];
  uint16_t perase[4];
};

inline void load_ext(const AugExt* src, ExtView* v) {
  const char* b = reinterpret_cast<const char*>(src);
  std::memcpy(&v->ext, b + offsetof(AugExt, ext), 1);
  std::memcpy(v->ra_vals, b + offsetof(AugExt, ra_vals), sizeof(v->ra_vals));
  std::memcpy(v->pra_ops, b + offsetof(AugExt, pra_ops), sizeof(v->pra_ops));
  std::memcpy(v->pra_mags, b + offsetof(AugExt, pra_mags), sizeof(v->pra_mags));
  std::memcpy(v->pra_vals, b + offsetof(AugExt, pra_vals), sizeof(v->pra_vals));
  std::memcpy(v->perase, b + offsetof(AugExt, perase), sizeof(v->perase));
}

// The dequantization rule, identical in Python (params.dq) and Triton.
inline int dq(uint32_t q, int n) { return (int)(((uint64_t)q * (uint64_t)n + kQ / 2) / kQ); }

// Integer box inside an h x w image from a quantized (top, left, height, width). q points
// into a packed record (any alignment): read it with memcpy, never as uint16_t loads.
inline void box_to_pixels(const uint16_t* q_any, int h, int w, int* top, int* left, int* bh, int* bw) {
  uint16_t q[4];
  std::memcpy(q, (const void*)q_any, sizeof q);
  int hh = dq(q[2], h), ww = dq(q[3], w);
  hh = hh < 1 ? 1 : (hh > h ? h : hh);
  ww = ww < 1 ? 1 : (ww > w ? w : ww);
  int t = dq(q[0], h), l = dq(q[1], w);
  *top = t > h - hh ? h - hh : t;
  *left = l > w - ww ? w - ww : l;
  *bh = hh;
  *bw = ww;
}

}  // namespace fl
