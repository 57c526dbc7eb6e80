// Dataset Decomposition (arXiv 2405.13226): split every document into chunks of 2^k + 1
// tokens (k in [min_k, max_k]) and write the chunks of length 2^k + 1 into bucket k.
//
// The rule is the reference's `get_binary` (apple/ml-dataset-decomposition), with the
// end-of-text token appended to each document (length L = len + 1):
//   pos = 0; while L - pos > 1:
//     k = floor(log2(L - pos - 1)); if k < min_k: stop (the remainder is dropped)
//     if k > max_k: k = randomize ? draw(seed, file, doc, chunk) : max_k
//     emit seq[pos : pos + 2^k + 1]; pos += 2^k + 1
// draw() picks k in [min_k, max_k] with P(k) proportional to 2^(max_k - k) from a
// counter-based hash of (seed, file, doc, chunk), so the result does not depend on the
// number of threads or on how the documents are split into calls (see fastload/format/
// decompose.py, `_chunk_hash`, for the same stream in Python).
//
// Two passes over the offsets: fl_dd_count counts the chunks per bucket for every block of
// `block` documents (and validates the tokens), Python allocates the per-bucket arrays
// (memory-mapped .npy files) and turns the counts into write offsets, and fl_dd_copy writes
// every chunk exactly once. Blocks are fixed-size, so the output order (document order inside
// each bucket) is independent of threading.
//
// fl_dd_gather is the loader's copy: rows of a bucket (given by address) -> contiguous
// input_ids = row[:-1] and targets = row[1:], int32 or int64, in one pass.
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>

#include "fl_common.h"

FL_DEFINE_LAST_ERROR

namespace {

constexpr int kMaxBuckets = 40;

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  uint64_t z = x;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t chunk_hash(uint64_t seed, uint64_t file, uint64_t doc, uint64_t chunk) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ file);
  h = splitmix64(h ^ doc);
  return splitmix64(h ^ chunk);
}

struct Rule {
  int min_k, max_k, randomize;
  uint64_t seed, file;
  uint64_t total_w;  // sum of 2^(max_k - k) over k in [min_k, max_k] = 2^(n) - 1

  // k in [min_k, max_k] with P(k) = 2^(max_k - k) / total_w: r uniform in [0, total_w)
  // (Lemire's multiply-shift; bias < total_w / 2^64), then walk the cumulative weights
  // from the shortest bucket (largest weight).
  inline int draw(uint64_t doc, uint64_t chunk) const {
    uint64_t h = chunk_hash(seed, file, doc, chunk);
    uint64_t r = (uint64_t)(((unsigned __int128)h * total_w) >> 64);
    int k = min_k;
    uint64_t acc = 1ull << (max_k - min_k);
    while (r >= acc) {
      ++k;
      acc += 1ull << (max_k - k);
    }
    return k;
  }

  // Walk one document of L tokens (EOT included); emit(k, pos) per chunk; returns the
  // number of dropped tokens.
  template <class F>
  inline int64_t walk(int64_t L, uint64_t doc, F&& emit) const {
    int64_t pos = 0;
    uint64_t c = 0;
    while (L - pos > 1) {
      int k = 63 - __builtin_clzll((uint64_t)(L - pos - 1));
      if (k < min_k) break;
      if (k > max_k) k = randomize ? draw(doc, c) : max_k;
      emit(k, pos);
      pos += (int64_t(1) << k) + 1;
      ++c;
    }
    return L - pos;
  }
};

int make_rule(Rule& r, int min_k, int max_k, int randomize, uint64_t seed, uint64_t file) {
  if (min_k < 0 || max_k < min_k || max_k - min_k + 1 > kMaxBuckets || max_k > 40)
    return fl::fail("bad bucket range [%d, %d] (need 0 <= min <= max <= 40)", min_k, max_k);
  r.min_k = min_k;
  r.max_k = max_k;
  r.randomize = randomize;
  r.seed = seed;
  r.file = file;
  r.total_w = (1ull << (max_k - min_k + 1)) - 1;
  return 0;
}

}  // namespace

// Pass 1. offsets: n_docs + 1 non-decreasing indices into tokens (tokens[offsets[d]:
// offsets[d+1]] is document d, without EOT). counts: [n_blocks, n_buckets] int64 (written),
// dropped: [n_blocks] int64 (written), n_blocks = ceil(n_docs / block); counts_cap and
// dropped_cap are their capacities in values. Tokens outside [0, vocab) fail (vocab <= 0:
// not checked), naming the first bad document and position.
FL_EXPORT int fl_dd_count(const int32_t* tokens, const int64_t* offsets, int64_t n_docs,
                          int min_k, int max_k, int randomize, uint64_t seed, uint64_t file,
                          int64_t vocab, int64_t block, int64_t* counts, int64_t counts_cap,
                          int64_t* dropped, int64_t dropped_cap, int nthreads) {
  return fl::guard("fl_dd_count", [&]() -> int {
  Rule rule;
  if (make_rule(rule, min_k, max_k, randomize, seed, file)) return -1;
  if (block < 1) return fl::fail("block must be >= 1");
  if (n_docs < 0) return fl::fail("negative document count %lld", (long long)n_docs);
  const int nb = max_k - min_k + 1;
  const int64_t n_blocks = (n_docs + block - 1) / block;
  if (n_blocks > 0 && (!counts || !dropped)) return fl::fail("fl_dd_count: null output");
  if (counts_cap < n_blocks * nb || dropped_cap < n_blocks)
    return fl::fail("fl_dd_count: outputs of %lld / %lld values are too small for %lld blocks x %d buckets",
                    (long long)counts_cap, (long long)dropped_cap, (long long)n_blocks, nb);
  std::atomic<int64_t> bad_doc{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> bad_order{std::numeric_limits<int64_t>::max()};
  if (fl::parallel_for(n_blocks, nthreads, 1, [&](long b0, long b1, int) {
    for (long b = b0; b < b1; ++b) {
      int64_t* cnt = counts + b * nb;
      for (int i = 0; i < nb; ++i) cnt[i] = 0;
      int64_t drop = 0;
      const int64_t d0 = b * block, d1 = d0 + block < n_docs ? d0 + block : n_docs;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t s = offsets[d], e = offsets[d + 1];
        if (e < s) {
          int64_t cur = bad_order.load();
          while (d < cur && !bad_order.compare_exchange_weak(cur, d)) {}
          continue;
        }
        if (vocab > 0) {
          // Branch-free range check over the document (vectorizes); bad tokens are rare.
          uint32_t any = 0;
          for (int64_t t = s; t < e; ++t) any |= (uint32_t)(tokens[t] < 0) | (uint32_t)(tokens[t] >= vocab);
          if (any) {
            int64_t cur = bad_doc.load();
            while (d < cur && !bad_doc.compare_exchange_weak(cur, d)) {}
          }
        }
        drop += rule.walk(e - s + 1, (uint64_t)d, [&](int k, int64_t) { ++cnt[k - min_k]; });
      }
      dropped[b] = drop;
    }
  }))
    return -1;
  if (bad_order.load() != std::numeric_limits<int64_t>::max()) {
    int64_t d = bad_order.load();
    return fl::fail("offsets decrease at document %lld (%lld > %lld)", (long long)d,
                    (long long)offsets[d], (long long)offsets[d + 1]);
  }
  if (bad_doc.load() != std::numeric_limits<int64_t>::max()) {
    int64_t d = bad_doc.load();
    for (int64_t t = offsets[d]; t < offsets[d + 1]; ++t)
      if (tokens[t] < 0 || tokens[t] >= vocab)
        return fl::fail("document %lld, position %lld: token id %d outside the vocabulary [0, %lld)",
                        (long long)d, (long long)(t - offsets[d]), tokens[t], (long long)vocab);
  }
  return 0;
  });
}

// Pass 2. counts / row_start: [n_blocks, n_buckets] int64, the chunks of each block in each
// bucket from pass 1 and the first row they go to (exclusive prefix sums over blocks plus the
// rows of earlier inputs); n_blocks_cap: the rows of those two arrays. out: n_buckets
// pointers to int32 arrays [out_rows[i], 2^k + 1] (null for a bucket with no rows). Every
// write is checked against that capacity: an input that changed after pass 1 (another
// document split, offsets past the tokens, a token outside the vocabulary) fails with an
// error instead of writing outside the mapped buckets or storing rows pass 1 never saw.
FL_EXPORT int fl_dd_copy(const int32_t* tokens, int64_t n_tokens, const int64_t* offsets, int64_t n_docs,
                         int min_k, int max_k, int randomize, uint64_t seed, uint64_t file,
                         int32_t eot, int64_t vocab, int64_t block, const int64_t* counts,
                         const int64_t* row_start, int64_t n_blocks_cap, int32_t* const* out,
                         const int64_t* out_rows, int nthreads) {
  return fl::guard("fl_dd_copy", [&]() -> int {
  Rule rule;
  if (make_rule(rule, min_k, max_k, randomize, seed, file)) return -1;
  if (block < 1) return fl::fail("block must be >= 1");
  if (n_docs < 0 || n_tokens < 0) return fl::fail("negative document or token count");
  const int nb = max_k - min_k + 1;
  const int64_t n_blocks = (n_docs + block - 1) / block;
  if (n_blocks > n_blocks_cap)
    return fl::fail("the input changed since the counting pass: %lld documents, %lld counted",
                    (long long)n_docs, (long long)(n_blocks_cap * block));
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int i = 0; i < nb; ++i) {
      const int64_t r0 = row_start[b * nb + i], c = counts[b * nb + i];
      if (r0 < 0 || c < 0 || c > out_rows[i] - r0 || (c > 0 && out[i] == nullptr))
        return fl::fail("rows [%lld, %lld) of bucket %d outside its %lld rows", (long long)r0,
                        (long long)(r0 + c), min_k + i, (long long)out_rows[i]);
    }
  if (n_docs > 0 && (offsets[0] < 0 || offsets[n_docs] > n_tokens))
    return fl::fail("offsets [%lld, %lld] outside the %lld tokens", (long long)offsets[0],
                    (long long)offsets[n_docs], (long long)n_tokens);
  std::atomic<int64_t> bad_block{std::numeric_limits<int64_t>::max()};
  if (fl::parallel_for(n_blocks, nthreads, 1, [&](long b0, long b1, int) {
    int64_t row[kMaxBuckets], end[kMaxBuckets];
    for (long b = b0; b < b1; ++b) {
      for (int i = 0; i < nb; ++i) {
        row[i] = row_start[b * nb + i];
        end[i] = row[i] + counts[b * nb + i];
      }
      bool bad = false;
      const int64_t d0 = b * block, d1 = d0 + block < n_docs ? d0 + block : n_docs;
      for (int64_t d = d0; d < d1 && !bad; ++d) {
        if (offsets[d + 1] < offsets[d] || offsets[d + 1] > n_tokens) {
          bad = true;
          break;
        }
        const int32_t* doc = tokens + offsets[d];
        const int64_t n = offsets[d + 1] - offsets[d];  // without EOT
        if (vocab > 0) {
          uint32_t any = 0;
          for (int64_t t = 0; t < n; ++t) any |= (uint32_t)(doc[t] < 0) | (uint32_t)(doc[t] >= vocab);
          if (any) {
            bad = true;
            break;
          }
        }
        rule.walk(n + 1, (uint64_t)d, [&](int k, int64_t pos) {
          const int i = k - min_k;
          if (bad || row[i] >= end[i]) {  // more chunks than pass 1 counted
            bad = true;
            return;
          }
          const int64_t w = (int64_t(1) << k) + 1;
          int32_t* dst = out[i] + row[i]++ * w;
          if (pos + w <= n) {
            std::memcpy(dst, doc + pos, (size_t)w * 4);
          } else {  // the chunk ends with the appended EOT (pos + w == n + 1)
            std::memcpy(dst, doc + pos, (size_t)(w - 1) * 4);
            dst[w - 1] = eot;
          }
        });
      }
      for (int i = 0; i < nb && !bad; ++i) bad = row[i] != end[i];  // fewer chunks than counted
      if (bad) {
        int64_t cur = bad_block.load();
        while (b < cur && !bad_block.compare_exchange_weak(cur, b)) {}
      }
    }
  }))
    return -1;
  if (bad_block.load() != std::numeric_limits<int64_t>::max()) {
    const int64_t b = bad_block.load();
    return fl::fail("the input changed since the counting pass: documents [%lld, %lld) do not split into "
                    "the chunks counted (or their offsets or tokens are now invalid)",
                    (long long)(b * block), (long long)std::min<int64_t>((b + 1) * block, n_docs));
  }
  return 0;
  });
}

namespace {
template <class T>
inline void shift_copy(const int32_t* src, T* in, T* tg, int64_t n) {
  for (int64_t t = 0; t < n; ++t) in[t] = (T)src[t];
  for (int64_t t = 0; t < n; ++t) tg[t] = (T)src[t + 1];
}
}  // namespace

// Loader copy. addrs: n_rows addresses of int32 rows of row_len tokens; writes
// inputs[r, :] = row[:-1] and targets[r, :] = row[1:] (both [n_rows, row_len - 1],
// contiguous) as int32 (out_bytes 4) or int64 (out_bytes 8); out_cap: the values each of
// inputs and targets holds.
FL_EXPORT int fl_dd_gather(const uint64_t* addrs, int64_t n_rows, int64_t row_len, void* inputs,
                           void* targets, int64_t out_cap, int out_bytes, int nthreads) {
  return fl::guard("fl_dd_gather", [&]() -> int {
  if (row_len < 2) return fl::fail("row_len must be >= 2, got %lld", (long long)row_len);
  if (out_bytes != 4 && out_bytes != 8) return fl::fail("out_bytes must be 4 or 8");
  const int64_t n = row_len - 1;
  if (n_rows < 0 || (double)n_rows * (double)n > (double)out_cap)
    return fl::fail("fl_dd_gather: outputs of %lld values are too small for %lld rows of %lld",
                    (long long)out_cap, (long long)n_rows, (long long)n);
  if (n_rows > 0 && (!addrs || !inputs || !targets)) return fl::fail("fl_dd_gather: null argument");
  // Each row is >= 1 KiB for the usual buckets; group rows so one task moves >= ~256 KiB.
  long grain = (long)(65536 / (n + 1)) + 1;
  return fl::parallel_for(n_rows, nthreads, grain, [&](long r0, long r1, int) {
    for (long r = r0; r < r1; ++r) {
      const int32_t* src = reinterpret_cast<const int32_t*>(addrs[r]);
      if (out_bytes == 8)
        shift_copy(src, static_cast<int64_t*>(inputs) + r * n, static_cast<int64_t*>(targets) + r * n, n);
      else
        shift_copy(src, static_cast<int32_t*>(inputs) + r * n, static_cast<int32_t*>(targets) + r * n, n);
    }
  });
  });
}

// memcpy of n bytes on nthreads threads (the benchmark's bandwidth yardstick); dst holds dst_cap.
FL_EXPORT int fl_dd_memcpy(void* dst, int64_t dst_cap, const void* src, int64_t n, int nthreads) {
  return fl::guard("fl_dd_memcpy", [&]() -> int {
  if (n < 0 || n > dst_cap) return fl::fail("fl_dd_memcpy: %lld bytes do not fit %lld", (long long)n, (long long)dst_cap);
  const long grain = 1 << 20;
  return fl::parallel_for((n + grain - 1) / grain, nthreads, 1, [&](long b0, long b1, int) {
    for (long b = b0; b < b1; ++b) {
      int64_t s = b * grain, e = s + grain < n ? s + grain : n;
      std::memcpy(static_cast<char*>(dst) + s, static_cast<const char*>(src) + s, (size_t)(e - s));
    }
  });
  });
}

// A keyed pseudo-random permutation of [0, n) evaluated per index (no O(n) table per epoch):
// out[i] = P(start + i). P is a bijection of [0, 2^bits) (2^bits >= n: rounds of xor-key,
// odd multiply and xorshift, each invertible modulo 2^bits) restricted to [0, n) by cycle
// walking (apply P again until the value is < n; on average < 2 applications). The sampler
// uses it to shuffle the rows of a bucket per (seed, epoch, bucket) at O(batch) cost per step.
namespace {
int permute_impl(int64_t n, uint64_t key, int64_t start, int64_t count, int64_t* out) {
  if (n < 1) return fl::fail("permute: n must be >= 1");
  if (start < 0 || count < 0 || start + count > n)
    return fl::fail("permute: range [%lld, %lld) outside [0, %lld)", (long long)start,
                    (long long)(start + count), (long long)n);
  int bits = 0;
  while ((int64_t(1) << bits) < n) ++bits;
  const uint64_t mask = bits >= 64 ? ~0ull : (1ull << bits) - 1;
  const int s = bits / 2 + 1;
  uint64_t k[4];
  uint64_t h = key;
  for (int r = 0; r < 4; ++r) k[r] = (h = splitmix64(h));
  if (bits <= 32) {
    // 32-bit lanes: the first application over a block of indices vectorizes (AVX2 vpmulld);
    // the rare out-of-range values are walked on scalarly.
    const uint32_t m32 = (uint32_t)mask;
    uint32_t kx[4], km[4];
    for (int r = 0; r < 4; ++r) { kx[r] = (uint32_t)k[r]; km[r] = (uint32_t)(k[r] >> 32) | 1u; }
    auto P = [&](uint32_t x) {
      for (int r = 0; r < 4; ++r) {
        x = (x ^ kx[r]) & m32;
        x = (x * km[r]) & m32;
        x ^= x >> s;
      }
      return x;
    };
    uint32_t y[256];
    // n <= 2^32 here; n == 2^32 never walks
    const uint32_t n32 = (uint32_t)n;
    for (int64_t i0 = 0; i0 < count; i0 += 256) {
      const int cnt = (int)(count - i0 < 256 ? count - i0 : 256);
      const uint32_t base = (uint32_t)(start + i0);
      for (int j = 0; j < cnt; ++j) y[j] = P(base + (uint32_t)j);
      // The walk, vectorized for its first steps: P is applied to every lane and kept only
      // where the value is still out of range (the same result as walking each lane; about
      // 40% of lanes need a step when n is just above a power of two). After three passes
      // ~2% remain for the scalar walk below.
      if (n < (int64_t(1) << 32)) {
        for (int pass = 0; pass < 3; ++pass) {
          uint32_t any = 0;
          for (int j = 0; j < cnt; ++j) {
            const uint32_t x = y[j], z = P(x);
            const uint32_t out_of_range = (uint32_t)(x >= n32);
            any |= out_of_range;
            y[j] = out_of_range ? z : x;
          }
          if (!any) break;
        }
      }
      for (int j = 0; j < cnt; ++j) {
        uint32_t x = y[j];
        while (x >= (uint64_t)n) x = P(x);
        out[i0 + j] = (int64_t)x;
      }
    }
    return 0;
  }
  for (int64_t i = 0; i < count; ++i) {
    uint64_t x = (uint64_t)(start + i);
    do {
      for (int r = 0; r < 4; ++r) {
        x = (x ^ k[r]) & mask;
        x = (x * ((k[r] >> 32) | 1ull)) & mask;  // odd multiplier: invertible mod 2^bits
        x ^= x >> s;
      }
    } while (x >= (uint64_t)n);
    out[i] = (int64_t)x;
  }
  return 0;
}
}  // namespace

// out: `count` int64 (its capacity is `count`, the number of values asked for).
FL_EXPORT int fl_dd_permute(int64_t n, uint64_t key, int64_t start, int64_t count, int64_t* out) {
  return fl::guard("fl_dd_permute", [&] { return permute_impl(n, key, start, count, out); });
}
