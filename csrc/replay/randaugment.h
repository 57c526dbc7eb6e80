// RandAugment's 14 ops on an interleaved RGB uint8 image, in place, in torchvision's v1
// (transforms.RandAugment) or v2 (transforms.v2.RandAugment) semantics.
#pragma once
#include <cstdint>

namespace fl {

constexpr int kRASemanticsV2 = 1 << 8;   // bit of num_bins: torchvision v2 semantics
constexpr int kRASemanticsPIL = 1 << 9;  // bit of num_bins: torchvision on PIL images (Pillow's ops)
constexpr int kRASemanticsMask = kRASemanticsV2 | kRASemanticsPIL;

// Applies ops[i] with signed magnitude bin mags[i] for i < n (ops equal to kRANone are
// skipped), in order, to img (h x w x 3, row stride w*3). Magnitude values follow
// torchvision's _augmentation_space(num_bins, (h, w)). num_bins may carry kRASemanticsV2
// (v2 arithmetic) or kRASemanticsPIL (Pillow's ops, csrc/replay/ra_pil.cpp; v1's tables),
// without either v1: the flag rides in num_bins so that the replay entry points keep their
// signature. scratch must hold h*w*3 bytes.
// Allocates nothing; returns 0, or -1 with fl::fail() set for an unknown op id.
int randaugment_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, int n,
                      int num_bins, uint8_t* scratch);

// One op on a PIL image (ra_pil.cpp), float magnitude as torchvision's _apply_op receives it.
int ra_pil_apply_one(uint8_t* img, int h, int w, int op, double mag, uint8_t* scratch);

// timm's RandAugment ops (ra_pil.cpp; randaugment_semantics="timm"): ops of the timm family
// (kRANone skipped) with their levels vals[i], negation (mags[i] < 0) and resampling
// (|mags[i]| == 2: BICUBIC, else BILINEAR) draws; fill: the geometric ops' fill colour.
// scratch holds h*w*3 bytes. Returns 0, or -1 with fl::fail() set (image untouched).
int ra_timm_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, const float* vals, int n,
                  const uint8_t fill[3], uint8_t* scratch);

}  // namespace fl
