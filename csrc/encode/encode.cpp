// Image -> file bytes (ByteFormer input): JPEG (libjpeg), PNG (zlib deflate, or stored
// deflate blocks when built without zlib) and baseline uncompressed TIFF, for a batch of
// uint8 images, in the shared thread pool. Every image writes into its own slot of the
// caller's buffer ([n, cap] bytes); an image that does not fit is an error naming it, never a
// write past the slot. fl_encode_bound gives a capacity that always fits PNG and TIFF (and
// JPEG at any quality up to a generous margin).
#include <cstdint>
#include <cstring>
#include <csetjmp>
#include <string>
#include <vector>

#include "fl_common.h"

#ifdef FASTLOAD_HAVE_JPEG
#include <cstdio>
#include <jpeglib.h>
#endif
#ifdef FASTLOAD_HAVE_ZLIB
#include <zlib.h>
#endif

namespace {

enum Format { JPEG = 0, PNG = 1, TIFF = 2 };

// A bounded writer over one output slot.
struct Out {
  uint8_t* p;
  int64_t cap, n = 0;
  bool put(const void* src, int64_t len) {
    if (n + len > cap) return false;
    std::memcpy(p + n, src, (size_t)len);
    n += len;
    return true;
  }
  bool u8(uint8_t v) { return put(&v, 1); }
  bool be32(uint32_t v) {
    uint8_t b[4] = {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
    return put(b, 4);
  }
  bool le16(uint16_t v) {
    uint8_t b[2] = {uint8_t(v), uint8_t(v >> 8)};
    return put(b, 2);
  }
  bool le32(uint32_t v) {
    uint8_t b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
    return put(b, 4);
  }
};

// Pixel (y, x, channel) of image `img`: NHWC when !chw, else NCHW (a rendered batch).
struct Src {
  const uint8_t* base;
  int h, w, c;
  bool chw;
  void row(int y, uint8_t* dst) const {  // interleaved RGB / gray row
    if (!chw) {
      std::memcpy(dst, base + (int64_t)y * w * c, (size_t)w * c);
      return;
    }
    const int64_t plane = (int64_t)h * w;
    for (int x = 0; x < w; ++x)
      for (int k = 0; k < c; ++k) dst[x * c + k] = base[k * plane + (int64_t)y * w + x];
  }
};

// ------------------------------------------------------------------ CRC32 / Adler32
uint32_t crc_table_entry(uint32_t c) {
  for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  return c;
}
const uint32_t* crc_table() {
  static uint32_t t[256];
  static bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) t[i] = crc_table_entry(i);
    return true;
  }();
  (void)init;
  return t;
}
uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) {
  const uint32_t* t = crc_table();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

// ------------------------------------------------------------------ PNG
bool png_chunk(Out& o, const char type[4], const uint8_t* data, uint32_t len) {
  if (!o.be32(len)) return false;
  int64_t start = o.n;
  if (!o.put(type, 4) || (len && !o.put(data, len))) return false;
  return o.be32(crc32_update(0, o.p + start, (size_t)(len + 4)));
}

// Filtered scanlines: each row starts with its filter type; Sub (1) predicts a byte from
// the one a pixel to its left, which deflates photos far better than None at no cost.
std::vector<uint8_t> png_rows(const Src& s) {
  const int64_t stride = (int64_t)s.w * s.c;
  std::vector<uint8_t> raw((size_t)(stride + 1) * s.h), line((size_t)stride);
  for (int y = 0; y < s.h; ++y) {
    s.row(y, line.data());
    uint8_t* d = raw.data() + (size_t)y * (stride + 1);
    d[0] = 1;
    for (int64_t i = 0; i < stride; ++i) d[1 + i] = uint8_t(line[i] - (i >= s.c ? line[i - s.c] : 0));
  }
  return raw;
}

int64_t png_zlib_bound(int64_t raw) {
#ifdef FASTLOAD_HAVE_ZLIB
  return (int64_t)compressBound((uLong)raw);
#else
  return raw + 6 + 5 * ((raw + 65534) / 65535) + 4;
#endif
}

bool encode_png(const Src& s, int level, Out& o) {
  static const uint8_t sig[8] = {137, 80, 78, 71, 13, 10, 26, 10};
  if (!o.put(sig, 8)) return false;
  uint8_t ihdr[13];
  auto be = [](uint8_t* p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; };
  be(ihdr, (uint32_t)s.w);
  be(ihdr + 4, (uint32_t)s.h);
  ihdr[8] = 8;                   // bit depth
  ihdr[9] = s.c == 3 ? 2 : 0;    // truecolour or greyscale
  ihdr[10] = ihdr[11] = ihdr[12] = 0;
  if (!png_chunk(o, "IHDR", ihdr, 13)) return false;
  std::vector<uint8_t> raw = png_rows(s);
  std::vector<uint8_t> z((size_t)png_zlib_bound((int64_t)raw.size()));
  size_t zlen = 0;
#ifdef FASTLOAD_HAVE_ZLIB
  uLongf dl = (uLongf)z.size();
  if (compress2(z.data(), &dl, raw.data(), (uLong)raw.size(), level) != Z_OK)
    throw std::runtime_error("zlib compress2 failed");
  zlen = dl;
#else
  (void)level;  // stored deflate blocks (no compression), valid zlib
  uint32_t a = 1, b = 0;
  for (uint8_t v : raw) { a = (a + v) % 65521; b = (b + a) % 65521; }
  z[zlen++] = 0x78; z[zlen++] = 0x01;
  size_t off = 0;
  do {
    size_t blk = std::min<size_t>(65535, raw.size() - off);
    z[zlen++] = (off + blk == raw.size()) ? 1 : 0;
    z[zlen++] = blk & 0xFF; z[zlen++] = blk >> 8;
    z[zlen++] = ~blk & 0xFF; z[zlen++] = (~blk >> 8) & 0xFF;
    std::memcpy(z.data() + zlen, raw.data() + off, blk);
    zlen += blk; off += blk;
  } while (off < raw.size());
  uint32_t ad = (b << 16) | a;
  z[zlen++] = ad >> 24; z[zlen++] = ad >> 16; z[zlen++] = ad >> 8; z[zlen++] = ad;
#endif
  return png_chunk(o, "IDAT", z.data(), (uint32_t)zlen) && png_chunk(o, "IEND", nullptr, 0);
}

// ------------------------------------------------------------------ TIFF (baseline, uncompressed)
constexpr int TIFF_ENTRIES = 10;
int64_t tiff_header_bytes() { return 8 + 2 + 12 * TIFF_ENTRIES + 4 + 8; }

bool encode_tiff(const Src& s, Out& o) {
  const uint32_t data_len = (uint32_t)((int64_t)s.h * s.w * s.c);
  const uint32_t ifd = 8, bps_off = ifd + 2 + 12 * TIFF_ENTRIES + 4, pix = bps_off + 8;
  if (!o.put("II*\0", 4) || !o.le32(ifd) || !o.le16(TIFF_ENTRIES)) return false;
  auto entry = [&](uint16_t tag, uint16_t type, uint32_t count, uint32_t value) {
    if (!o.le16(tag) || !o.le16(type) || !o.le32(count)) return false;
    if (type == 3 && count == 1) return o.le16((uint16_t)value) && o.le16(0);
    return o.le32(value);
  };
  const bool rgb = s.c == 3;
  bool ok = entry(256, 4, 1, (uint32_t)s.w) && entry(257, 4, 1, (uint32_t)s.h) &&
            (rgb ? entry(258, 3, 3, bps_off) : entry(258, 3, 1, 8)) && entry(259, 3, 1, 1) &&
            entry(262, 3, 1, rgb ? 2 : 1) && entry(273, 4, 1, pix) && entry(277, 3, 1, (uint32_t)s.c) &&
            entry(278, 4, 1, (uint32_t)s.h) && entry(279, 4, 1, data_len) && entry(284, 3, 1, 1) &&
            o.le32(0);  // no next IFD
  if (!ok) return false;
  uint16_t bps[4] = {8, 8, 8, 0};
  if (!o.put(bps, 8)) return false;  // little-endian host (x86-64)
  std::vector<uint8_t> line((size_t)s.w * s.c);
  for (int y = 0; y < s.h; ++y) {
    s.row(y, line.data());
    if (!o.put(line.data(), (int64_t)line.size())) return false;
  }
  return true;
}

// ------------------------------------------------------------------ JPEG
#ifdef FASTLOAD_HAVE_JPEG
struct JpegCtx {
  jpeg_error_mgr pub;
  jpeg_destination_mgr dest;
  jmp_buf jump;
  char msg[JMSG_LENGTH_MAX];
  bool overflow;
  Out* out;
};

void jpeg_on_error(j_common_ptr ci) {
  JpegCtx* c = (JpegCtx*)ci->client_data;
  (*ci->err->format_message)(ci, c->msg);
  longjmp(c->jump, 1);
}
void jpeg_dest_init(j_compress_ptr ci) {
  JpegCtx* c = (JpegCtx*)ci->client_data;
  c->dest.next_output_byte = c->out->p;
  c->dest.free_in_buffer = (size_t)c->out->cap;
}
boolean jpeg_dest_full(j_compress_ptr ci) {  // the slot is full: the image does not fit
  JpegCtx* c = (JpegCtx*)ci->client_data;
  c->overflow = true;
  longjmp(c->jump, 1);
}
void jpeg_dest_term(j_compress_ptr ci) {
  JpegCtx* c = (JpegCtx*)ci->client_data;
  c->out->n = c->out->cap - (int64_t)c->dest.free_in_buffer;
}

// 0: written; 1: does not fit; -1: libjpeg error (message in msg).
int encode_jpeg(const Src& s, int quality, Out& o, char* msg, size_t msg_cap) {
  struct State {  // everything live across setjmp is here (no destructors skipped)
    jpeg_compress_struct ci;
    JpegCtx ctx;
    volatile bool created = false;
  } st;
  std::vector<uint8_t> line((size_t)s.w * s.c);
  st.ctx.overflow = false;
  st.ctx.out = &o;
  st.ctx.msg[0] = 0;
  st.ci.err = jpeg_std_error(&st.ctx.pub);
  st.ctx.pub.error_exit = jpeg_on_error;
  st.ci.client_data = &st.ctx;
  if (setjmp(st.ctx.jump)) {
    if (st.created) jpeg_destroy_compress(&st.ci);
    if (st.ctx.overflow) return 1;
    snprintf(msg, msg_cap, "%s", st.ctx.msg);
    return -1;
  }
  jpeg_create_compress(&st.ci);
  st.created = true;
  st.ctx.dest.init_destination = jpeg_dest_init;
  st.ctx.dest.empty_output_buffer = jpeg_dest_full;
  st.ctx.dest.term_destination = jpeg_dest_term;
  st.ci.dest = &st.ctx.dest;
  st.ci.image_width = (JDIMENSION)s.w;
  st.ci.image_height = (JDIMENSION)s.h;
  st.ci.input_components = s.c;
  st.ci.in_color_space = s.c == 3 ? JCS_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&st.ci);
  jpeg_set_quality(&st.ci, quality, TRUE);
  jpeg_start_compress(&st.ci, TRUE);
  while (st.ci.next_scanline < st.ci.image_height) {
    s.row((int)st.ci.next_scanline, line.data());
    JSAMPROW r = line.data();
    jpeg_write_scanlines(&st.ci, &r, 1);
  }
  jpeg_finish_compress(&st.ci);
  jpeg_destroy_compress(&st.ci);
  return 0;
}
#endif

}  // namespace

// A capacity per image that always fits (JPEG: raw size x 2 + headers; libjpeg's output
// stays under the raw size at quality <= 100 on 8-bit input save for tiny images, whose
// headers alone are ~600 bytes).
FL_EXPORT int64_t fl_encode_bound(int format, int h, int w, int c) {
  const int64_t raw = (int64_t)h * w * c;
  if (format == PNG) return 8 + 25 + 12 + png_zlib_bound(raw + h) + 12;
  if (format == TIFF) return tiff_header_bytes() + raw;
  return 2 * raw + 4096;
}

FL_EXPORT int fl_encode_available(int format) {
#ifdef FASTLOAD_HAVE_JPEG
  return 1;
#else
  return format != JPEG;
#endif
}

// Encode n images (uint8, NHWC, or NCHW when chw != 0; c = 1 or 3) into out[i * cap, ...),
// lengths[i] bytes each. quality: JPEG 1..100; level: PNG deflate level 0..9.
FL_EXPORT int fl_encode_batch(const uint8_t* images, int64_t n, int h, int w, int c, int chw, int format,
                              int quality, int level, uint8_t* out, int64_t cap, int64_t* lengths,
                              int threads) {
  return fl::guard("fl_encode_batch", [&]() -> int {
    if (n < 0 || h <= 0 || w <= 0 || (c != 1 && c != 3))
      return fl::fail("fl_encode_batch: bad shape n=%lld h=%d w=%d c=%d (c must be 1 or 3)", (long long)n, h, w, c);
    if (format < 0 || format > 2) return fl::fail("fl_encode_batch: unknown format %d", format);
    if (format == JPEG && (quality < 1 || quality > 100))
      return fl::fail("fl_encode_batch: JPEG quality %d outside [1, 100]", quality);
    if (format == PNG && (level < 0 || level > 9))
      return fl::fail("fl_encode_batch: PNG level %d outside [0, 9]", level);
    if (format == TIFF && (int64_t)h * w * c + tiff_header_bytes() > 0xFFFFFFFFll)
      return fl::fail("fl_encode_batch: image too large for a TIFF without BigTIFF");
#ifndef FASTLOAD_HAVE_JPEG
    if (format == JPEG) return fl::fail("fl_encode_batch: fastload was built without libjpeg");
#endif
    const int64_t plane = (int64_t)h * w * c;
    return fl::parallel_for(n, threads, 1, [&](long b, long e, int) {
      for (long i = b; i < e; ++i) {
        Src s{images + i * plane, h, w, c, chw != 0};
        Out o{out + i * cap, cap};
        bool ok = true;
        if (format == PNG) {
          ok = encode_png(s, level, o);
        } else if (format == TIFF) {
          ok = encode_tiff(s, o);
        } else {
#ifdef FASTLOAD_HAVE_JPEG
          char msg[JMSG_LENGTH_MAX + 8];
          int r = encode_jpeg(s, quality, o, msg, sizeof msg);
          if (r < 0) throw std::runtime_error(std::string("image ") + std::to_string(i) + ": libjpeg: " + msg);
          ok = r == 0;
#endif
        }
        if (!ok)
          throw std::runtime_error("image " + std::to_string(i) + " does not fit the output capacity of " +
                                   std::to_string(cap) + " bytes");
        lengths[i] = o.n;
      }
    });
  });
}
