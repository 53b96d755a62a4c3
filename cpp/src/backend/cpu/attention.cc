#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {

namespace {

// One (token, kv head) pair: all query heads of the group at once, so each K/V row is read once.
// Positions are walked block by block (a head's rows are contiguous inside a block).
void attend_group(const AttentionParams& p, int64_t t, int kvh, std::vector<float>& scores) {
  const int group = p.num_heads / p.num_kv_heads;
  const int hd = p.head_dim, bs = p.block_size;
  const int32_t pos = p.positions[t];
  const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
  const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
  const int64_t n = pos - first + 1;
  const int64_t head_stride = static_cast<int64_t>(bs) * hd;  // one head's slice of a block
  auto block_base = [&](const float* cache, int32_t j) {
    return cache + (static_cast<int64_t>(table[j / bs]) * p.num_kv_heads + kvh) * head_stride;
  };
  scores.resize(static_cast<size_t>(n) * group);
  const float* q0 = p.q + t * p.ldq + static_cast<int64_t>(kvh) * group * hd;

  // Scores: sc[g * n + (j - first)] = scale * q_g . k_j
  for (int32_t j = first; j <= pos;) {
    const int32_t end = std::min<int32_t>(pos + 1, (j / bs + 1) * bs);
    const float* kb = block_base(p.k_cache, j);
    for (; j < end; ++j) {
      const float* k = kb + static_cast<int64_t>(j % bs) * hd;
      for (int g = 0; g < group; ++g) {
        const float* q = q0 + static_cast<int64_t>(g) * hd;
        float dot = 0.0f;
        for (int i = 0; i < hd; ++i) dot += q[i] * k[i];
        scores[static_cast<int64_t>(g) * n + (j - first)] = dot * p.scale;
      }
    }
  }
  // Softmax per head.
  for (int g = 0; g < group; ++g) {
    float* sc = scores.data() + static_cast<int64_t>(g) * n;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      sc[j] = std::exp(sc[j] - mx);
      sum += sc[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
  }
  // Weighted sum of V.
  float* out0 = p.out + t * static_cast<int64_t>(p.num_heads) * hd + static_cast<int64_t>(kvh) * group * hd;
  std::fill(out0, out0 + static_cast<int64_t>(group) * hd, 0.0f);
  for (int32_t j = first; j <= pos;) {
    const int32_t end = std::min<int32_t>(pos + 1, (j / bs + 1) * bs);
    const float* vb = block_base(p.v_cache, j);
    for (; j < end; ++j) {
      const float* v = vb + static_cast<int64_t>(j % bs) * hd;
      for (int g = 0; g < group; ++g) {
        const float w = scores[static_cast<int64_t>(g) * n + (j - first)];
        float* o = out0 + static_cast<int64_t>(g) * hd;
        for (int i = 0; i < hd; ++i) o[i] += w * v[i];
      }
    }
  }
}

}  // namespace

void paged_attention(const AttentionParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0);
  const int64_t items = p.num_tokens * p.num_kv_heads;
  auto run = [&](int64_t b, int64_t e) {
    std::vector<float> scores;
    for (int64_t it = b; it < e; ++it) attend_group(p, it / p.num_kv_heads, static_cast<int>(it % p.num_kv_heads), scores);
  };
  // Cost grows with context; only spread across threads when there is enough of it.
  int64_t ctx = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) ctx += p.positions[t] + 1;
  if (ctx * p.num_heads * p.head_dim < (1 << 16)) {
    run(0, items);
  } else {
    pool.parallel_for(items, 1, run);
  }
}

}  // namespace accelcore::cpu
