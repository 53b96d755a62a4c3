// The paged-attention kernel body, compiled once per instruction set: attention_{scalar,avx2,
// avx512}.cc include it inside their own namespace, each with its own compiler flags, and the
// compiler vectorises the loops below for that ISA.
//
// Layout (one layer): K is [num_blocks][num_kv_heads][head_dim][block_size] (transposed inside a
// block, so the scores of a whole block are one vector FMA per channel) and V is
// [num_blocks][num_kv_heads][block_size][head_dim]. Scores are computed for every lane of a block,
// in or out of range, so each position's score comes from the same instructions wherever it sits;
// lanes outside [first, pos] are then ignored.
//
// Not a standalone header: the including file defines the namespace.

inline void attend_items(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int group = p.num_heads / p.num_kv_heads;
  const int hd = p.head_dim, bs = p.block_size;
  const int64_t head_floats = static_cast<int64_t>(bs) * hd;  // one head's slice of a block
  std::vector<float> scores;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t t = item / p.num_kv_heads;
    const int kvh = static_cast<int>(item % p.num_kv_heads);
    const int32_t pos = p.positions[t];
    const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
    const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
    const int32_t b0 = first / bs, b1 = pos / bs;
    const int64_t span = static_cast<int64_t>(b1 - b0 + 1) * bs;  // lanes per head
    const int32_t lo = first - b0 * bs, hi = pos - b0 * bs;         // valid lanes [lo, hi]
    scores.resize(static_cast<size_t>(span) * group);
    const float* q0 = p.q + t * p.ldq + static_cast<int64_t>(kvh) * group * hd;

    for (int32_t b = b0; b <= b1; ++b) {
      const float* kt = p.k_cache + (static_cast<int64_t>(table[b]) * p.num_kv_heads + kvh) * head_floats;
      for (int g = 0; g < group; ++g) {
        const float* q = q0 + static_cast<int64_t>(g) * hd;
        float* s = scores.data() + g * span + static_cast<int64_t>(b - b0) * bs;
        for (int j = 0; j < bs; ++j) s[j] = 0.0f;
        for (int i = 0; i < hd; ++i) {
          const float qi = q[i];
          const float* row = kt + static_cast<int64_t>(i) * bs;
          for (int j = 0; j < bs; ++j) s[j] += qi * row[j];
        }
      }
    }
    float* out0 = p.out + t * static_cast<int64_t>(p.num_heads) * hd + static_cast<int64_t>(kvh) * group * hd;
    for (int g = 0; g < group; ++g) {
      float* s = scores.data() + g * span;
      float mx = -INFINITY;
      for (int32_t j = lo; j <= hi; ++j) {
        s[j] *= p.scale;
        mx = std::max(mx, s[j]);
      }
      float sum = 0.0f;
      for (int32_t j = lo; j <= hi; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.0f / sum;
      float* o = out0 + static_cast<int64_t>(g) * hd;
      for (int i = 0; i < hd; ++i) o[i] = 0.0f;
      for (int32_t j = lo; j <= hi; ++j) {
        const int32_t abs_pos = b0 * bs + j;
        const float* v = p.v_cache + ((static_cast<int64_t>(table[abs_pos / bs]) * p.num_kv_heads + kvh) * bs + abs_pos % bs) * hd;
        const float w = s[j] * inv;
        for (int i = 0; i < hd; ++i) o[i] += w * v[i];
      }
    }
  }
}
