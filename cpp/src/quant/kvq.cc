#include "quant/kvq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace accelcore {

namespace kvq_ref {
#include "quant/kvq_dequant_impl.h"
}  // namespace kvq_ref

KvqLayout kvq_layout(int bits, int head_dim, int block_size) {
  KvqLayout l;
  l.bits = bits;
  l.head_dim = head_dim;
  l.block_size = block_size;
  const size_t codes = (static_cast<size_t>(head_dim) * block_size * bits + 7) / 8;
  l.v_step = 3 * sizeof(float);
  l.sc = l.v_step + 2 * static_cast<size_t>(block_size);
  l.mc = l.sc + head_dim;
  l.v_zero = l.mc + head_dim;
  l.k_codes = l.v_zero + block_size;
  l.v_codes = l.k_codes + codes;
  l.bytes = l.v_codes + codes;
  return l;
}

void kvq_dequantize_k(const KvqLayout& l, const uint8_t* rec, float* kt) { kvq_ref::dequantize_k(l, rec, kt); }
void kvq_dequantize_v(const KvqLayout& l, const uint8_t* rec, float* v) { kvq_ref::dequantize_v(l, rec, v); }

namespace {

inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }  // |v| < 2^22

void put_code(uint8_t* codes, int bits, int64_t i, int q) {
  if (bits == 8) {
    codes[i] = static_cast<uint8_t>(q);
  } else {
    uint8_t& b = codes[i >> 1];
    b = (i & 1) ? static_cast<uint8_t>((b & 0x0f) | (q << 4)) : static_cast<uint8_t>((b & 0xf0) | q);
  }
}

}  // namespace

void kvq_quantize(const KvqLayout& l, const float* kt, const float* v, uint8_t* rec) {
  const int hd = l.head_dim, bs = l.block_size, qmax = l.qmax();
  std::memset(rec, 0, l.bytes);
  // Keys: each channel's range over the block's tokens, then its offset and step in two levels.
  // The offset code rounds down and the step code up, so each channel's coded range still covers
  // its values; the steps are computed from the coded offsets.
  std::vector<float> lo(hd), hi(hd), step(hd);
  for (int c = 0; c < hd; ++c) {
    const float* row = kt + static_cast<int64_t>(c) * bs;
    lo[c] = *std::min_element(row, row + bs);
    hi[c] = *std::max_element(row, row + bs);
  }
  const float min_base = *std::min_element(lo.begin(), lo.end());
  const float min_unit = (*std::max_element(lo.begin(), lo.end()) - min_base) / 255.0f;
  float max_step = 0.0f;
  for (int c = 0; c < hd; ++c) {
    int mc = min_unit > 0.0f ? static_cast<int>(std::clamp(std::floor((lo[c] - min_base) / min_unit), 0.0f, 255.0f)) : 0;
    while (mc > 0 && min_base + min_unit * static_cast<float>(mc) > lo[c]) --mc;
    rec[l.mc + c] = static_cast<uint8_t>(mc);
    lo[c] = min_base + min_unit * static_cast<float>(mc);
    step[c] = (hi[c] - lo[c]) / static_cast<float>(qmax);
    max_step = std::max(max_step, step[c]);
  }
  const float step_unit = max_step / 255.0f;
  const float unit[3] = {step_unit, min_base, min_unit};
  std::memcpy(rec, unit, sizeof(unit));
  uint8_t* kcodes = rec + l.k_codes;
  for (int c = 0; c < hd; ++c) {
    int sc = step_unit > 0.0f ? static_cast<int>(std::clamp(std::ceil(step[c] / step_unit), 0.0f, 255.0f)) : 0;
    while (sc < 255 && step_unit * static_cast<float>(sc) * static_cast<float>(qmax) < hi[c] - lo[c]) ++sc;
    rec[l.sc + c] = static_cast<uint8_t>(sc);
    const float s = step_unit * static_cast<float>(sc);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    const float* row = kt + static_cast<int64_t>(c) * bs;
    for (int j = 0; j < bs; ++j) {
      const float q = std::clamp(round_even((row[j] - lo[c]) * inv), 0.0f, static_cast<float>(qmax));
      put_code(kcodes, l.bits, static_cast<int64_t>(c) * bs + j, static_cast<int>(q));
    }
  }
  // Values: per token, a range that includes zero (so the zero point is an integer code).
  uint8_t* vcodes = rec + l.v_codes;
  for (int j = 0; j < bs; ++j) {
    const float* row = v + static_cast<int64_t>(j) * hd;
    const float mn = std::min(0.0f, *std::min_element(row, row + hd));
    const float mx = std::max(0.0f, *std::max_element(row, row + hd));
    // The step in bfloat16, rounded up so that it still covers the range.
    const float exact = (mx - mn) / static_cast<float>(qmax);
    uint32_t bits;
    std::memcpy(&bits, &exact, sizeof(bits));
    uint16_t h = static_cast<uint16_t>(bits >> 16);
    if ((bits & 0xffff) != 0) ++h;
    std::memcpy(rec + l.v_step + 2 * j, &h, sizeof(h));
    bits = static_cast<uint32_t>(h) << 16;
    float s;
    std::memcpy(&s, &bits, sizeof(s));
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    const float zero = std::clamp(round_even(-mn * inv), 0.0f, static_cast<float>(qmax));
    rec[l.v_zero + j] = static_cast<uint8_t>(zero);
    for (int c = 0; c < hd; ++c) {
      const float q = std::clamp(round_even(row[c] * inv) + zero, 0.0f, static_cast<float>(qmax));
      put_code(vcodes, l.bits, static_cast<int64_t>(j) * hd + c, static_cast<int>(q));
    }
  }
}

}  // namespace accelcore
