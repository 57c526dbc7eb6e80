// RandAugment's 14 ops (torchvision semantics) on an interleaved RGB uint8 image, in place.
#pragma once
#include <cstdint>

namespace fl {

// Applies ops[i] with signed magnitude bin mags[i] for i < n (ops equal to kRANone are
// skipped), in order, to img (h x w x 3, row stride w*3). Magnitude values follow
// torchvision's _augmentation_space(num_bins, (h, w)). scratch must hold h*w*3 bytes.
// Allocates nothing; returns 0, or -1 with fl::fail() set for an unknown op id.
int randaugment_apply(uint8_t* img, int h, int w, const uint8_t* ops, const int8_t* mags, int n,
                      int num_bins, uint8_t* scratch);

}  // namespace fl
