// Dequantization of a quantized KV record (format: quant/kvq.h), compiled once per instruction
// set: the attention kernels include it inside their own namespace (an inline function shared
// across files built with different flags could be linked to the wrong one), and quant/kvq.cc
// for the reference. Plain loops: the compiler vectorises them, and without FMA contraction (the
// attention files' flags) every path dequantizes to the same floats.
//
// Not a standalone header: the including file defines the namespace and includes quant/kvq.h
// and <cstring>.

inline void dequantize_k(const KvqLayout& l, const uint8_t* rec, float* kt) {
  float unit[3];
  std::memcpy(unit, rec, sizeof(unit));
  const int hd = l.head_dim, bs = l.block_size;
  const uint8_t* codes = rec + l.k_codes;
  for (int c = 0; c < hd; ++c) {
    const float step = unit[0] * static_cast<float>(rec[l.sc + c]);
    const float min = unit[1] + unit[2] * static_cast<float>(rec[l.mc + c]);
    float* row = kt + static_cast<int64_t>(c) * bs;
    const int64_t base = static_cast<int64_t>(c) * bs;
    if (l.bits == 8) {
      for (int j = 0; j < bs; ++j) row[j] = step * static_cast<float>(codes[base + j]) + min;
    } else if (bs % 2 == 0) {
      const uint8_t* b = codes + base / 2;
      for (int j = 0; j < bs / 2; ++j) {
        row[2 * j] = step * static_cast<float>(b[j] & 15) + min;
        row[2 * j + 1] = step * static_cast<float>(b[j] >> 4) + min;
      }
    } else {
      for (int j = 0; j < bs; ++j) {
        const int64_t i = base + j;
        row[j] = step * static_cast<float>((codes[i >> 1] >> ((i & 1) * 4)) & 15) + min;
      }
    }
  }
}

inline void dequantize_v(const KvqLayout& l, const uint8_t* rec, float* v) {
  const int hd = l.head_dim, bs = l.block_size;
  const uint8_t* codes = rec + l.v_codes;
  for (int j = 0; j < bs; ++j) {
    uint16_t h;
    std::memcpy(&h, rec + l.v_step + 2 * j, sizeof(h));
    const uint32_t bits = static_cast<uint32_t>(h) << 16;  // bfloat16
    float step;
    std::memcpy(&step, &bits, sizeof(step));
    const float zero = static_cast<float>(rec[l.v_zero + j]);
    float* row = v + static_cast<int64_t>(j) * hd;
    const int64_t base = static_cast<int64_t>(j) * hd;
    if (l.bits == 8) {
      for (int c = 0; c < hd; ++c) row[c] = step * (static_cast<float>(codes[base + c]) - zero);
    } else {  // head_dim is even: a row starts on a byte
      const uint8_t* b = codes + base / 2;
      for (int c = 0; c < hd / 2; ++c) {
        row[2 * c] = step * (static_cast<float>(b[c] & 15) - zero);
        row[2 * c + 1] = step * (static_cast<float>(b[c] >> 4) - zero);
      }
    }
  }
}
