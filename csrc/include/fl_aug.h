// The stored augmentation record, mirroring fastload/sample/params.py AUG_DTYPE (packed,
// 47 bytes). Read that file's docstring for the meaning of every field.
#pragma once
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
