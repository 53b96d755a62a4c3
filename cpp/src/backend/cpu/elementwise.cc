#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {

void apply_rope(const RopeParams& p) {
  const int64_t half = p.head_dim / 2;
  for (int64_t m = 0; m < p.m; ++m) {
    const float* c = p.cos + m * half;
    const float* s = p.sin + m * half;
    for (int64_t h = 0; h < p.num_heads; ++h) {
      float* x = p.x + m * p.ld + h * p.head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

namespace scalar_impl {
#include "backend/cpu/elementwise_impl.h"
}  // namespace scalar_impl

void rms_norm_scalar(const RmsNormParams& p) { scalar_impl::rms_norm_rows(p); }
void silu_mul_scalar(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0, int64_t i1) {
  scalar_impl::silu_mul_rows(gate_up, out, m, d, i0, i1 < 0 ? d : i1);
}

void rms_norm(const RmsNormParams& p) {
  ACCEL_DCHECK(p.x && p.weight && p.out && p.d > 0);
  switch (active_isa()) {
    case Isa::kAvx512: return rms_norm_avx512(p);
    case Isa::kAvx2: return rms_norm_avx2(p);
    case Isa::kScalar: return rms_norm_scalar(p);
  }
}

void silu_mul(const float* gate_up, float* out, int64_t m, int64_t d, int64_t i0, int64_t i1) {
  switch (active_isa()) {
    case Isa::kAvx512: return silu_mul_avx512(gate_up, out, m, d, i0, i1);
    case Isa::kAvx2: return silu_mul_avx2(gate_up, out, m, d, i0, i1);
    case Isa::kScalar: return silu_mul_scalar(gate_up, out, m, d, i0, i1);
  }
}

double softmax_exps_scalar(const SoftmaxExpParams& p) { return scalar_impl::softmax_exps_row(p); }

double softmax_exps(const SoftmaxExpParams& p) {
  ACCEL_DCHECK(p.x && p.out && p.n > 0);
  switch (active_isa()) {
    case Isa::kAvx512: return softmax_exps_avx512(p);
    case Isa::kAvx2: return softmax_exps_avx2(p);
    case Isa::kScalar: return softmax_exps_scalar(p);
  }
  return 0.0;
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void write_kv(const KvWriteParams& p) {
  const int64_t hd = p.head_dim;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slots[t];
    ACCEL_DCHECK(slot >= 0);
    const int64_t block = slot / p.block_size, off = slot % p.block_size;
    for (int h = p.head_begin; h < (p.head_end < 0 ? p.num_kv_heads : p.head_end); ++h) {
      const int64_t head = (block * p.num_kv_heads + h) * p.block_size * hd;  // this head's slice of the block
      const float* k = p.k + t * p.ld + h * hd;
      float* kt = p.k_cache + head + off;  // K transposed: channel i of this token at kt[i * block_size]
      for (int64_t i = 0; i < hd; ++i) kt[i * p.block_size] = k[i];
      std::memcpy(p.v_cache + head + off * hd, p.v + t * p.ld + h * hd, hd * sizeof(float));
    }
  }
}

void copy_kv_slot(const KvCopyParams& p, int64_t src, int64_t dst) {
  const int64_t hd = p.head_dim, bs = p.block_size;
  for (int h = 0; h < p.num_kv_heads; ++h) {
    const int64_t sh = ((src / bs) * p.num_kv_heads + h) * bs * hd, dh = ((dst / bs) * p.num_kv_heads + h) * bs * hd;
    for (int64_t i = 0; i < hd; ++i) p.k_cache[dh + i * bs + dst % bs] = p.k_cache[sh + i * bs + src % bs];
    std::memcpy(p.v_cache + dh + (dst % bs) * hd, p.v_cache + sh + (src % bs) * hd, hd * sizeof(float));
  }
}

}  // namespace accelcore::cpu
