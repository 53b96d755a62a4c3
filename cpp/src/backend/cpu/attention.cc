#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {

namespace {

// One (token, kv head) pair: all query heads of the group at once, so each K/V row is read once.
void attend_group(const AttentionParams& p, int64_t t, int kvh, std::vector<float>& scores) {
  const int group = p.num_heads / p.num_kv_heads;
  const int hd = p.head_dim, bs = p.block_size;
  const int32_t pos = p.positions[t];
  const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
  const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
  const int64_t n = pos - first + 1;
  scores.resize(static_cast<size_t>(n) * group);
  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    const float* q = p.q + t * p.ldq + static_cast<int64_t>(h) * hd;
    float* sc = scores.data() + static_cast<int64_t>(g) * n;
    float mx = -INFINITY;
    for (int32_t j = first; j <= pos; ++j) {
      const float* k = p.k_cache + ((static_cast<int64_t>(table[j / bs]) * p.num_kv_heads + kvh) * bs + j % bs) * hd;
      float dot = 0.0f;
      for (int i = 0; i < hd; ++i) dot += q[i] * k[i];
      dot *= p.scale;
      sc[j - first] = dot;
      mx = std::max(mx, dot);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      sc[j] = std::exp(sc[j] - mx);
      sum += sc[j];
    }
    const float inv = 1.0f / sum;
    float* o = p.out + t * static_cast<int64_t>(p.num_heads) * hd + static_cast<int64_t>(h) * hd;
    std::fill(o, o + hd, 0.0f);
    for (int32_t j = first; j <= pos; ++j) {
      const float* v = p.v_cache + ((static_cast<int64_t>(table[j / bs]) * p.num_kv_heads + kvh) * bs + j % bs) * hd;
      const float w = sc[j - first] * inv;
      for (int i = 0; i < hd; ++i) o[i] += w * v[i];
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
