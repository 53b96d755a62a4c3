#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore::cpu {

namespace {

void (*attention_kernel())(const AttentionParams&, int64_t, int64_t) {
  switch (active_isa()) {
    case Isa::kAvx512: return attention_avx512;
    case Isa::kAvx2: return attention_avx2;
    case Isa::kScalar: break;
  }
  return attention_scalar;
}

}  // namespace

void paged_attention(const AttentionParams& p, ThreadPool& pool) {
  ACCEL_DCHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0);
  void (*kernel)(const AttentionParams&, int64_t, int64_t) = attention_kernel();
  // Work items are (token, kv head) pairs; cost grows with context, so only spread across
  // threads when there is enough of it.
  const int64_t items = p.num_tokens * p.num_kv_heads;
  int64_t ctx = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) ctx += p.positions[t] + 1;
  if (ctx * p.num_heads * p.head_dim < (1 << 16)) {
    kernel(p, 0, items);
  } else {
    pool.parallel_for(items, 1, [&](int64_t b, int64_t e) { kernel(p, b, e); });
  }
}

void paged_attention_kv_heads(const AttentionParams& p, int kvh0, int kvh1) {
  ACCEL_DCHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 && 0 <= kvh0 && kvh0 <= kvh1 &&
               kvh1 <= p.num_kv_heads);
  if (kvh0 == kvh1) return;
  void (*kernel)(const AttentionParams&, int64_t, int64_t) = attention_kernel();
  for (int64_t t = 0; t < p.num_tokens; ++t) kernel(p, t * p.num_kv_heads + kvh0, t * p.num_kv_heads + kvh1);
}

}  // namespace accelcore::cpu
