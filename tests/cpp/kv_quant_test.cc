// The quantized KV cache format (quant/kvq.h) and attention over it: quantize/dequantize round
// trips within half a step of every value (keys with large per-channel offsets, odd block sizes,
// 4 and 8 bits); and on every ISA path the machine has, attention reading quantized blocks is
// bit-identical to the float kernel reading the dequantized floats in their place (the token's
// own block in float), through a stage table that relocates the float blocks, and whether a
// sequence's tokens share a call or come one at a time.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/kvq.h"
#include "test_util.h"

namespace accelcore {
namespace {

struct Shape {
  int bits, head_dim, block_size;
};

std::string describe(const Shape& s) {
  return "bits=" + std::to_string(s.bits) + " head_dim=" + std::to_string(s.head_dim) +
         " block_size=" + std::to_string(s.block_size);
}

float bf16_step(const uint8_t* rec, const KvqLayout& l, int j) {
  uint16_t h;
  std::memcpy(&h, rec + l.v_step + 2 * j, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

TEST(KvqFormat, RoundTripWithinHalfAStep) {
  std::mt19937 rng(5);
  for (const Shape& s : {Shape{4, 8, 16}, Shape{4, 64, 16}, Shape{4, 16, 5}, Shape{4, 6, 7}, Shape{8, 8, 16},
                         Shape{8, 64, 16}, Shape{8, 16, 5}}) {
    const std::string what = describe(s);
    const int hd = s.head_dim, bs = s.block_size;
    const KvqLayout l = kvq_layout(s.bits, hd, bs);
    ASSERT_EQ(l.bytes, 12 + 3 * static_cast<size_t>(bs) + 2 * hd + (static_cast<size_t>(hd) * bs * s.bits + 7) / 8 * 2)
        << what;
    // Keys: channels around offsets from -20 to 20 with spreads from 0 (constant) to 4, as RoPE'd
    // keys look; values around zero, one token all zeros.
    std::vector<float> kt(static_cast<size_t>(hd) * bs), v(static_cast<size_t>(bs) * hd);
    for (int c = 0; c < hd; ++c) {
      const float offset = std::uniform_real_distribution<float>(-20, 20)(rng);
      const float spread = c % 5 == 0 ? 0.0f : std::uniform_real_distribution<float>(0.01f, 4.0f)(rng);
      for (int j = 0; j < bs; ++j) kt[c * bs + j] = offset + spread * std::uniform_real_distribution<float>(-1, 1)(rng);
    }
    v = testing::random_floats(rng, v.size(), -3.0f, 3.0f);
    std::fill(v.begin(), v.begin() + hd, 0.0f);
    std::vector<uint8_t> rec(l.bytes);
    kvq_quantize(l, kt.data(), v.data(), rec.data());
    std::vector<float> kd(kt.size()), vd(v.size());
    kvq_dequantize_k(l, rec.data(), kd.data());
    kvq_dequantize_v(l, rec.data(), vd.data());
    float unit[3];
    std::memcpy(unit, rec.data(), sizeof(unit));
    for (int c = 0; c < hd; ++c) {
      const float step = unit[0] * rec[l.sc + c];
      const float lo = *std::min_element(&kt[c * bs], &kt[c * bs] + bs), hi = *std::max_element(&kt[c * bs], &kt[c * bs] + bs);
      // The coded step is no coarser than the range (widened by one offset unit) needs, rounded up a code.
      EXPECT_LE(step * l.qmax(), (hi - lo + unit[2]) * (1.0f + 1.0f / std::max(1, int(rec[l.sc + c]))) + unit[0] * l.qmax() * 1e-3f)
          << what << " channel " << c;
      for (int j = 0; j < bs; ++j)
        ASSERT_LE(std::fabs(kd[c * bs + j] - kt[c * bs + j]), step * 0.5f + 1e-5f * (std::fabs(kt[c * bs + j]) + 1))
            << what << " key channel " << c << " token " << j;
    }
    for (int j = 0; j < bs; ++j) {
      const float step = bf16_step(rec.data(), l, j);
      float lo = 0, hi = 0;
      for (int c = 0; c < hd; ++c) lo = std::min(lo, v[j * hd + c]), hi = std::max(hi, v[j * hd + c]);
      EXPECT_LE(step * l.qmax(), (hi - lo) * (1 + 1.0f / 128));  // bfloat16, rounded up
      for (int c = 0; c < hd; ++c)
        ASSERT_LE(std::fabs(vd[j * hd + c] - v[j * hd + c]), step * 0.5f + 1e-6f) << what << " value token " << j;
    }
    for (int c = 0; c < hd; ++c) EXPECT_EQ(vd[c], 0.0f) << what;  // the zero token stays zero
  }
}

using AttnKernel = void (*)(const cpu::AttentionParams&, int64_t, int64_t);

std::vector<std::pair<std::string, AttnKernel>> attention_paths() {
  std::vector<std::pair<std::string, AttnKernel>> out = {{"scalar", cpu::attention_scalar}};
  const cpu::Isa best = cpu::detected_isa();
  if (static_cast<int>(best) >= static_cast<int>(cpu::Isa::kAvx2)) out.push_back({"avx2", cpu::attention_avx2});
  if (static_cast<int>(best) >= static_cast<int>(cpu::Isa::kAvx512)) out.push_back({"avx512", cpu::attention_avx512});
  return out;
}

// Attention parameters for the tokens at `positions` (sequence seq_of_token, block tables at
// offsets) over the float pools kf / vf and the bits-bit records recs; output and staging unset.
cpu::AttentionParams quantized_params(const std::vector<float>& q, int heads, int kv_heads, int hd, int bs,
                                      const std::vector<int32_t>& positions, const std::vector<int32_t>& seq_of_token,
                                      const std::vector<int32_t>& tables, const std::vector<int32_t>& offsets,
                                      const std::vector<float>& kf, const std::vector<float>& vf, int bits,
                                      const std::vector<uint8_t>& recs) {
  cpu::AttentionParams p;
  p.q = q.data();
  p.ldq = static_cast<int64_t>(heads) * hd;
  p.positions = positions.data();
  p.seq_of_token = seq_of_token.data();
  p.block_tables = tables.data();
  p.block_table_offset = offsets.data();
  p.num_tokens = static_cast<int64_t>(positions.size());
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = hd;
  p.block_size = bs;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.k_cache = kf.data();
  p.v_cache = vf.data();
  p.kv_bits = bits;
  p.kv_records = recs.data();
  return p;
}

TEST(KvqAttention, QuantizedBlocksReadAsTheirDequantizedFloats) {
  std::mt19937 rng(9);
  struct Case {
    int bits, heads, kv_heads, head_dim, block_size;
  };
  for (const Case& c : {Case{4, 4, 2, 16, 4}, Case{8, 4, 2, 16, 4}, Case{4, 8, 2, 64, 16}, Case{4, 2, 2, 8, 16},
                        Case{4, 3, 1, 6, 5}}) {
    const int kvh = c.kv_heads, hd = c.head_dim, bs = c.block_size, H = c.heads;
    const std::string what = "bits=" + std::to_string(c.bits) + " heads=" + std::to_string(H) + "/" +
                             std::to_string(kvh) + " head_dim=" + std::to_string(hd) + " bs=" + std::to_string(bs);
    const KvqLayout l = kvq_layout(c.bits, hd, bs);
    const int len = 5 * bs + 3, nblocks = (len + bs - 1) / bs, pool_blocks = nblocks + 3;
    const int64_t head_floats = static_cast<int64_t>(bs) * hd;
    // One sequence's blocks at shuffled ids; every block's float form in the "staging" pool at a
    // shuffled stage index, and its record in the quantized pool.
    std::vector<int32_t> table(pool_blocks), stage(pool_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    table.resize(nblocks);
    std::iota(stage.begin(), stage.end(), 0);
    std::shuffle(stage.begin(), stage.end(), rng);
    const size_t pool_floats = static_cast<size_t>(pool_blocks) * kvh * head_floats;
    std::vector<float> kf = testing::random_floats(rng, pool_floats, -2, 2), vf = testing::random_floats(rng, pool_floats);
    for (size_t i = 0; i < pool_floats; i += 7) kf[i] += 15.0f;  // some large key offsets
    std::vector<uint8_t> recs(static_cast<size_t>(pool_blocks) * kvh * l.bytes);
    // The dequantized floats of every block, in block-id order, for the reference.
    std::vector<float> kd(pool_floats), vd(pool_floats);
    for (int b = 0; b < pool_blocks; ++b)
      for (int h = 0; h < kvh; ++h) {
        const int64_t f = (static_cast<int64_t>(stage[b]) * kvh + h) * head_floats;
        uint8_t* rec = recs.data() + (static_cast<size_t>(b) * kvh + h) * l.bytes;
        kvq_quantize(l, kf.data() + f, vf.data() + f, rec);
        const int64_t d = (static_cast<int64_t>(b) * kvh + h) * head_floats;
        kvq_dequantize_k(l, rec, kd.data() + d);
        kvq_dequantize_v(l, rec, vd.data() + d);
      }
    // Tokens: every position of the sequence, one at a time in the reference.
    std::vector<int32_t> positions(len), seq_of_token(len, 0), offsets = {0};
    std::iota(positions.begin(), positions.end(), 0);
    const int64_t ldq = H * hd;
    std::vector<float> q = testing::random_floats(rng, static_cast<size_t>(len) * ldq, -2, 2);
    for (const auto& [name, kernel] : attention_paths()) {
      cpu::AttentionParams p = quantized_params(q, H, kvh, hd, bs, positions, seq_of_token, table, offsets, kf, vf, c.bits, recs);
      p.stage_of_block = stage.data();
      std::vector<float> got(static_cast<size_t>(len) * H * hd);
      p.out = got.data();
      kernel(p, 0, static_cast<int64_t>(len) * kvh);
      // Reference: the float kernel over a pool (by block id) holding the dequantized floats for
      // the blocks before the token's own and the float ones from its own block on.
      for (int t = 0; t < len; ++t) {
        std::vector<float> kr(kd), vr(vd);
        for (int b = positions[t] / bs; b < nblocks; ++b)
          for (int h = 0; h < kvh; ++h) {
            const int64_t d = (static_cast<int64_t>(table[b]) * kvh + h) * head_floats;
            const int64_t f = (static_cast<int64_t>(stage[table[b]]) * kvh + h) * head_floats;
            std::copy(kf.begin() + f, kf.begin() + f + head_floats, kr.begin() + d);
            std::copy(vf.begin() + f, vf.begin() + f + head_floats, vr.begin() + d);
          }
        cpu::AttentionParams r = p;
        r.kv_bits = 0;
        r.kv_records = nullptr;
        r.stage_of_block = nullptr;
        r.k_cache = kr.data();
        r.v_cache = vr.data();
        std::vector<float> want(static_cast<size_t>(len) * H * hd);
        r.out = want.data();
        kernel(r, static_cast<int64_t>(t) * kvh, static_cast<int64_t>(t + 1) * kvh);
        ASSERT_EQ(0, std::memcmp(got.data() + static_cast<size_t>(t) * H * hd, want.data() + static_cast<size_t>(t) * H * hd,
                                 sizeof(float) * H * hd))
            << what << " " << name << " position " << t;
      }
    }
  }
}

// Tokens that share a call and read the same blocks (a prompt chunk, a draft tree, sequences
// sharing a cached prefix) dequantize each block once between them (DequantMemo): calls holding
// several sequences, a lone decode token among them, and splits inside a token's kv heads (as
// threads take them) all read the same floats as one token alone.
TEST(KvqAttention, TokensSharingACallReadTheSameBitsAsAlone) {
  std::mt19937 rng(21);
  for (const Shape& c : {Shape{4, 16, 4}, Shape{4, 8, 16}, Shape{8, 64, 16}, Shape{4, 6, 5}}) {
    const int kvh = 2, H = 4, hd = c.head_dim, bs = c.block_size;
    const KvqLayout l = kvq_layout(c.bits, hd, bs);
    const int len = 5 * bs + 3, nblocks = (len + bs - 1) / bs, pool_blocks = 3 * nblocks;
    const int64_t head_floats = static_cast<int64_t>(bs) * hd;
    // Three sequences on shuffled blocks, floats at their block ids (no staging); the second and
    // third share their first blocks with the first (a prefix-cache hit).
    std::vector<int32_t> tables(pool_blocks);
    std::iota(tables.begin(), tables.end(), 0);
    std::shuffle(tables.begin(), tables.end(), rng);
    for (int b = 0; b < 2; ++b) tables[nblocks + b] = tables[2 * nblocks + b] = tables[b];
    tables[2 * nblocks + 2] = tables[2];
    const size_t pool_floats = static_cast<size_t>(pool_blocks) * kvh * head_floats;
    std::vector<float> kf = testing::random_floats(rng, pool_floats, -2, 2), vf = testing::random_floats(rng, pool_floats);
    std::vector<uint8_t> recs(static_cast<size_t>(pool_blocks) * kvh * l.bytes);
    std::vector<float> kd(pool_floats), vd(pool_floats);
    for (int64_t i = 0; i < static_cast<int64_t>(pool_blocks) * kvh; ++i) {
      uint8_t* rec = recs.data() + i * l.bytes;
      kvq_quantize(l, kf.data() + i * head_floats, vf.data() + i * head_floats, rec);
      kvq_dequantize_k(l, rec, kd.data() + i * head_floats);
      kvq_dequantize_v(l, rec, vd.data() + i * head_floats);
    }
    // Sequence 0: every position; 1: its last position alone; 2: its last four.
    std::vector<int32_t> positions, seq_of_token, offsets = {0, nblocks, 2 * nblocks};
    for (int j = 0; j < len; ++j) positions.push_back(j), seq_of_token.push_back(0);
    positions.push_back(len - 1), seq_of_token.push_back(1);
    for (int j = len - 4; j < len; ++j) positions.push_back(j), seq_of_token.push_back(2);
    const int T = static_cast<int>(positions.size());
    const int64_t ldq = H * hd, items = static_cast<int64_t>(T) * kvh;
    std::vector<float> q = testing::random_floats(rng, static_cast<size_t>(T) * ldq, -2, 2);
    for (const auto& [name, kernel] : attention_paths()) {
      cpu::AttentionParams p = quantized_params(q, H, kvh, hd, bs, positions, seq_of_token, tables, offsets, kf, vf, c.bits, recs);
      std::vector<float> got(static_cast<size_t>(T) * H * hd);
      p.out = got.data();
      for (const auto& [b, e] : {std::pair<int64_t, int64_t>{0, 7 * kvh + 1}, {7 * kvh + 1, (len + 2) * kvh},
                                 {(len + 2) * kvh, items}})
        kernel(p, b, e);
      for (int t = 0; t < T; ++t) {
        // The token alone, over a float pool holding the dequantized floats before its own block.
        std::vector<float> kr(kf), vr(vf);
        const int32_t* table = tables.data() + offsets[seq_of_token[t]];
        for (int b = 0; b < positions[t] / bs; ++b) {
          const int64_t d = static_cast<int64_t>(table[b]) * kvh * head_floats;
          std::copy(kd.begin() + d, kd.begin() + d + kvh * head_floats, kr.begin() + d);
          std::copy(vd.begin() + d, vd.begin() + d + kvh * head_floats, vr.begin() + d);
        }
        cpu::AttentionParams r = p;
        r.kv_bits = 0;
        r.kv_records = nullptr;
        r.k_cache = kr.data();
        r.v_cache = vr.data();
        std::vector<float> want(static_cast<size_t>(T) * H * hd);
        r.out = want.data();
        kernel(r, static_cast<int64_t>(t) * kvh, static_cast<int64_t>(t + 1) * kvh);
        ASSERT_EQ(0, std::memcmp(got.data() + static_cast<size_t>(t) * H * hd, want.data() + static_cast<size_t>(t) * H * hd,
                                 sizeof(float) * H * hd))
            << describe(c) << " " << name << " token " << t << " (sequence " << seq_of_token[t] << ")";
      }
    }
  }
}

}  // namespace
}  // namespace accelcore
