// The paged-attention kernel alone, one thread: microseconds per row and layer for a stories260K
// layer's shape (8 query heads, 4 kv heads, head dim 8, blocks of 16) at several context lengths,
// for a plain decode row and for a row with a chain of 4 draft nodes after it (5 rows), the kv
// heads in two calls of two (as the phased split runs them) and in one call of all four. The
// cache is random and 64-byte aligned; each timing is the best of 5 runs of 20,000 calls.
// Then a TinyLlama layer's shape (32 query heads, 4 kv heads, head dim 64, blocks of 16): one
// decode row, and 8 rows of one sequence (a draft chain, or a prompt chunk's last rows) in one
// call (one thread), over a float cache and over 4- and 8-bit records (quant/kvq.h), at 256 and
// 1024 positions.
//
//   cmake -S . -B build-bench -DACCELCORE_BUILD_BENCHMARKS=ON -DCMAKE_BUILD_TYPE=Release
//   cmake --build build-bench --target attention_bench && build-bench/benchmarks/cpp/attention_bench
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/kvq.h"
#include "util/thread_pool.h"
#include "util/buffer.h"

using namespace accelcore;

namespace {

void tinyllama_shape() {
  constexpr int kKv = 4, kHeads = 32, kHd = 64, kBs = 16, kRows = 8;
  ThreadPool pool(1);  // one call over all the rows' items, as one thread's share of a step
  std::printf("\nTinyLlama layer shape, one call of all kv heads; us per row and layer\n");
  std::printf("| context | rows | float | kv8 | kv4 |\n|---|---|---|---|---|\n");
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> d(-1, 1);
  for (int ctx : {256, 1024}) {
    const int blocks = (ctx + kRows) / kBs + 1;
    const size_t per_block = static_cast<size_t>(kHd) * kBs, floats = static_cast<size_t>(blocks) * kKv * per_block;
    FloatBuffer k, v;
    k.resize(floats);
    v.resize(floats);
    for (size_t i = 0; i < floats; ++i) k[i] = d(rng), v[i] = d(rng);
    std::vector<float> q(kRows * kHeads * kHd), out(kRows * kHeads * kHd);
    for (float& x : q) x = d(rng);
    std::vector<std::vector<uint8_t>> recs;
    for (int bits : {8, 4}) {
      const KvqLayout lay = kvq_layout(bits, kHd, kBs);
      recs.emplace_back(static_cast<size_t>(blocks) * kKv * lay.bytes);
      for (int i = 0; i < blocks * kKv; ++i)
        kvq_quantize(lay, k.data() + i * per_block, v.data() + i * per_block, recs.back().data() + i * lay.bytes);
    }
    std::vector<int32_t> table(blocks), seq(kRows, 0), offset{0}, pos(kRows);
    for (int i = 0; i < blocks; ++i) table[i] = i;
    for (int rows : {1, kRows}) {
      for (int t = 0; t < rows; ++t) pos[t] = ctx - rows + 1 + t;
      double us[3];
      for (int way = 0; way < 3; ++way) {
        cpu::AttentionParams p;
        p.q = q.data(), p.ldq = kHeads * kHd, p.out = out.data(), p.k_cache = k.data(), p.v_cache = v.data();
        p.positions = pos.data(), p.seq_of_token = seq.data(), p.block_tables = table.data();
        p.block_table_offset = offset.data(), p.num_tokens = rows, p.num_heads = kHeads, p.num_kv_heads = kKv;
        p.head_dim = kHd, p.block_size = kBs, p.scale = 0.125f;
        if (way > 0) p.kv_bits = way == 1 ? 8 : 4, p.kv_records = recs[way - 1].data();
        double best = 1e30;
        for (int r = 0; r < 6; ++r) {
          const int calls = 8000 / (ctx / 128) / rows;
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < calls; ++i) cpu::paged_attention(p, pool);
          const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / calls;
          if (r > 0) best = std::min(best, t);
        }
        us[way] = best / rows;
      }
      std::printf("| %d | %d | %.1f | %.1f | %.1f |\n", ctx, rows, us[0], us[1], us[2]);
    }
  }
}

}  // namespace

int main() {
  constexpr int kKv = 4, kHeads = 8, kHd = 8, kBs = 16, kBlocks = 64;
  const size_t floats = static_cast<size_t>(kBlocks) * kKv * kHd * kBs;
  FloatBuffer k, v;
  k.resize(floats);
  v.resize(floats);
  std::vector<float> q(8 * kHeads * kHd), out(8 * kHeads * kHd);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> d(-1, 1);
  for (size_t i = 0; i < floats; ++i) k[i] = d(rng), v[i] = d(rng);
  for (float& x : q) x = d(rng);
  std::vector<int32_t> table(kBlocks);
  for (int i = 0; i < kBlocks; ++i) table[i] = i;
  std::printf("path %s; us per row and layer (all heads)\n", cpu::isa_name(cpu::active_isa()));
  std::printf("| context | rows | 2 calls of 2 kv heads | 1 call of 4 |\n|---|---|---|---|\n");
  for (int ctx : {40, 150, 250, 500}) {
    for (int rows : {1, 5}) {
      // The root at position ctx, then draft nodes at ctx + 1 .. (a chain: each attends to its
      // ancestors' slots, which are the next positions here).
      std::vector<int32_t> pos, seq(rows, 0), offset{0}, extra_offset{0};
      std::vector<int64_t> extra;
      for (int t = 0; t < rows; ++t) {
        pos.push_back(ctx + t);
        for (int a = 1; a <= t; ++a) extra.push_back(ctx + a);
        extra_offset.push_back(static_cast<int32_t>(extra.size()));
      }
      cpu::AttentionParams p;
      p.q = q.data(), p.ldq = kHeads * kHd, p.out = out.data(), p.k_cache = k.data(), p.v_cache = v.data();
      p.positions = pos.data(), p.seq_of_token = seq.data(), p.block_tables = table.data();
      p.block_table_offset = offset.data(), p.num_tokens = rows, p.num_heads = kHeads, p.num_kv_heads = kKv;
      p.head_dim = kHd, p.block_size = kBs, p.scale = 0.35f;
      if (rows > 1) p.extra_offset = extra_offset.data(), p.extra_slots = extra.data();
      double us[2];
      for (int way = 0; way < 2; ++way) {
        double best = 1e30;
        for (int r = 0; r < 6; ++r) {
          constexpr int kCalls = 20000;
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < kCalls; ++i) {
            if (way == 0) {
              cpu::paged_attention_kv_heads(p, 0, 2);
              cpu::paged_attention_kv_heads(p, 2, 4);
            } else {
              cpu::paged_attention_kv_heads(p, 0, 4);
            }
          }
          const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kCalls;
          if (r > 0) best = std::min(best, t);  // the first run warms up
        }
        us[way] = best / rows;
      }
      std::printf("| %d | %d | %.3f | %.3f |\n", ctx, rows, us[0], us[1]);
    }
  }
  tinyllama_shape();
  return 0;
}
