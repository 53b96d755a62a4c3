// Paged attention for head dim 8 (stories260K and other small models), where the generic kernel
// (attention_impl.h) spends most of its time weighting positions one at a time: the part shared by
// the ISA files that have such a kernel. It is built around "virtual blocks" of 16 consecutive
// positions aligned to multiples of 16: position j always sits in lane j mod 16, whatever the
// block size and whether it is read in order from the paged cache or from a draft token's own
// slots, so a token's bits do not depend on either (nor on the thread split). Blocks the paged
// cache does not hold as one aligned 16-position float block (other block sizes, quantized
// blocks, lanes from draft slots) are copied or dequantized into staging first, and lanes outside
// the token's range are marked invalid. A token's query heads run side by side (those of all its
// kv heads in the thread's range, up to kHeads), so their dependent chains overlap.
//
// Not a standalone header: the including file defines the namespace and kHeads (query heads per
// pass), includes this after attention_impl.h, and defines attend_heads<NX> for NX = 1 to 4: the
// scores, softmax and weighted sum of one pass over a token's virtual blocks.

constexpr int kD = 8, kL = 16;

struct VBlock {
  const float* kt;  // [8][16]: channel i of lane l at kt[16 i + l]
  const float* v;   // [16][8]: lane l's values at v[8 l]
  uint16_t valid;   // lanes whose positions are in range: bits la to lz, contiguous
};

// One pass over a token's virtual blocks for NX query heads (from head x0 of kv head h0 on),
// their accumulators in registers.
struct HeadPass {
  const AttentionParams& p;
  const VBlock* blocks;  // [kv head][nvb]
  float* scores;         // [head][nvb][16]
  int32_t nvb;
  int group;
  int64_t t;
  int h0, x0;
};

template <int NX>
void attend_heads(const HeadPass& hp);

void attend_d8(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int group = p.num_heads / p.num_kv_heads, bs = p.block_size;
  const int64_t head_floats = static_cast<int64_t>(bs) * kD;
  const KvqLayout lay = kvq_layout(p.kv_bits, kD, bs);
  // Per thread, kept between calls: a call may cover only a token's kv heads.
  thread_local Scratch scores, stage, dk, dv;
  thread_local std::vector<VBlock> blocks;
  thread_local DequantMemo memo;
  memo.begin(p, item_begin, item_end);
  dk.resize(p.kv_bits ? head_floats : 0);
  dv.resize(p.kv_bits ? head_floats : 0);
  auto pool_block = [&](int32_t block) -> int64_t { return p.stage_of_block ? p.stage_of_block[block] : block; };

  for (int64_t item = item_begin; item < item_end;) {
    // This token's kv heads in the range, all at once: their heads' chains overlap below.
    const int64_t t = item / p.num_kv_heads;
    const int h0 = static_cast<int>(item % p.num_kv_heads);
    const int nh = static_cast<int>(std::min<int64_t>(item_end - item, p.num_kv_heads - h0));
    item += nh;
    const int32_t pos = p.positions[t];
    const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
    const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
    int n_extra = p.extra_offset ? p.extra_offset[t + 1] - p.extra_offset[t] : 0;
    const int64_t* extra_slots = n_extra ? p.extra_slots + p.extra_offset[t] : nullptr;
    if (n_extra) {
      const int k = extras_in_order(p, table, pos, n_extra, extra_slots);
      n_extra -= k, extra_slots += k;
    }
    const int32_t last = pos - n_extra;  // in order from the cache up to here, then draft slots
    const int32_t own_block = pos / bs;  // blocks before it are read quantized (kv_bits != 0)
    const int32_t vb0 = first / kL, nvb = pos / kL - vb0 + 1;
    blocks.resize(static_cast<size_t>(nh) * nvb);
    stage.resize(static_cast<size_t>(nh) * nvb * 2 * kL * kD);
    scores.resize(static_cast<size_t>(nh) * group * nvb * kL);

    // Where each virtual block's K and V come from, per kv head.
    for (int hh = 0; hh < nh; ++hh) {
      const int kvh = h0 + hh;
      int32_t dequantized = -1;  // the block now in dqk/dqv
      const float *dqk = nullptr, *dqv = nullptr;
      for (int32_t i = 0; i < nvb; ++i) {
        const int32_t base = (vb0 + i) * kL;
        const int la = std::max(first - base, 0), lz = std::min(pos - base, kL - 1);
        VBlock& vb = blocks[static_cast<size_t>(hh) * nvb + i];
        vb.valid = static_cast<uint16_t>(((1u << (lz + 1)) - 1) & ~((1u << la) - 1));
        float* sk = stage.data() + (static_cast<size_t>(hh) * nvb + i) * 2 * kL * kD;
        float* sv = sk + kL * kD;
        const int32_t b = base / bs;
        if (bs == kL && base + lz <= last) {  // one whole block of the cache, in order
          if (p.kv_bits && b < own_block) {
            const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[b]) * p.num_kv_heads + kvh) * lay.bytes;
            if (!memo.get(lay, rec, table[b], kvh, &vb.kt, &vb.v)) {
              dequantize_k(lay, rec, sk);
              dequantize_v(lay, rec, sv);
              vb.kt = sk, vb.v = sv;
            }
          } else {
            const int64_t h = (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
            vb.kt = p.k_cache + h, vb.v = p.v_cache + h;
          }
          continue;
        }
        // A draft token's block of the cache (block size 16, in float): its in-order lanes copied
        // whole, the lanes past them then replaced or masked. Otherwise position by
        // position: from the cache (any block size, quantized or not) or a draft slot.
        int l0 = la;
        if (bs == kL && base <= last && !(p.kv_bits && b < own_block)) {
          const int64_t h = (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
          std::memcpy(sk, p.k_cache + h, kL * kD * sizeof(float));
          std::memcpy(sv, p.v_cache + h, kL * kD * sizeof(float));
          l0 = std::max(la, last - base + 1);
        } else {
          std::memset(sk, 0, 2 * kL * kD * sizeof(float));
        }
        for (int l = l0; l <= lz; ++l) {
          const int32_t j = base + l;
          const float *kcol, *vrow;  // channel c at kcol[c * bs]
          if (j <= last) {
            const int32_t pb = j / bs, off = j % bs;
            if (p.kv_bits && pb < own_block) {
              if (dequantized != pb) {
                const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[pb]) * p.num_kv_heads + kvh) * lay.bytes;
                if (!memo.get(lay, rec, table[pb], kvh, &dqk, &dqv)) {
                  dequantize_k(lay, rec, dk.data());
                  dequantize_v(lay, rec, dv.data());
                  dqk = dk.data(), dqv = dv.data();
                }
                dequantized = pb;
              }
              kcol = dqk + off, vrow = dqv + static_cast<int64_t>(off) * kD;
            } else {
              const int64_t h = (pool_block(table[pb]) * p.num_kv_heads + kvh) * head_floats;
              kcol = p.k_cache + h + off, vrow = p.v_cache + h + static_cast<int64_t>(off) * kD;
            }
          } else {  // draft slots index the float pools directly
            const int64_t slot = extra_slots[j - last - 1];
            const int64_t h = ((slot / bs) * p.num_kv_heads + kvh) * head_floats, off = slot % bs;
            kcol = p.k_cache + h + off, vrow = p.v_cache + h + off * kD;
          }
          for (int c = 0; c < kD; ++c) sk[c * kL + l] = kcol[static_cast<int64_t>(c) * bs];
          std::memcpy(sv + l * kD, vrow, kD * sizeof(float));
        }
        vb.kt = sk, vb.v = sv;
      }
    }

    // Query heads in passes of kHeads; head x = (kv head h0 + x / group, its query head x % group).
    const int heads = nh * group;
    for (int x0 = 0; x0 < heads; x0 += kHeads) {
      const HeadPass hp{p, blocks.data(), scores.data(), nvb, group, t, h0, x0};
      static_assert(kHeads == 4);  // the cases below
      switch (std::min(kHeads, heads - x0)) {
        case 4: attend_heads<4>(hp); break;
        case 3: attend_heads<3>(hp); break;
        case 2: attend_heads<2>(hp); break;
        default: attend_heads<1>(hp); break;
      }
    }
  }
}

