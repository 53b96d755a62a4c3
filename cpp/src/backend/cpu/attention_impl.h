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

#include "backend/cpu/exp_impl.h"
#include "quant/kvq_dequant_impl.h"

// A 16-float vector: one zmm on the AVX-512 path; elsewhere two 8-float halves, each op applied
// to both. (GCC's own 64-byte vector type, where registers are narrower, is lowered piecewise,
// partly lane by lane through the stack: the AVX2 attention ran 30x slower than AVX-512's.) The
// same lane-wise arithmetic either way.
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));
#if defined(__AVX512F__)
typedef float V16 __attribute__((vector_size(64)));
inline V16 pair16(float a, float b) { return V16{a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b}; }
constexpr size_t kRegisterBytes = 64;
constexpr int kAccRegisters = 16;  // of 32: the accumulators a pass may hold
#else
struct V16 {
  V8 lo, hi;
  V16& operator+=(const V16& o) {
    lo += o.lo, hi += o.hi;
    return *this;
  }
  friend V16 operator+(V16 a, const V16& b) { return a += b; }
  friend V16 operator*(const V16& a, const V16& b) { return {a.lo * b.lo, a.hi * b.hi}; }
  friend V16 operator*(float s, const V16& v) { return {s * v.lo, s * v.hi}; }
};
inline V16 pair16(float a, float b) { return {V8{a, a, a, a, a, a, a, a}, V8{b, b, b, b, b, b, b, b}}; }
#if defined(__AVX2__)
constexpr size_t kRegisterBytes = 32;
#else
constexpr size_t kRegisterBytes = 16;
#endif
constexpr int kAccRegisters = 8;  // of 16
#endif
static_assert(sizeof(V16) == 64, "V16 is 16 contiguous floats");
// The widest float vector in one register: the weighted sum's unit.
using VNative = std::conditional_t<kRegisterBytes == 64, V16, std::conditional_t<kRegisterBytes == 32, V8, V4>>;
constexpr int kV16Registers = static_cast<int>(64 / kRegisterBytes);  // registers a V16 takes
template <class V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Each half loaded and stored as a whole: a 64-byte memcpy into the struct goes through the stack
// in 16-byte pieces, and its 32-byte reads then miss store forwarding.
#if defined(__AVX512F__)
inline V16 load16(const float* p) { return loadv<V16>(p); }
inline void store16(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }
#else
inline V16 load16(const float* p) { return {loadv<V8>(p), loadv<V8>(p + 8)}; }
inline void store16(float* p, V16 v) {
  std::memcpy(p, &v.lo, sizeof(v.lo));
  std::memcpy(p + 8, &v.hi, sizeof(v.hi));
}
#endif
// Keeps v in a register: where one load feeds several products, GCC otherwise folds it into each
// product's memory operand, loading it once per use.
template <class V>
inline void pin(V& v) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) <= kRegisterBytes) asm("" : "+v"(v));  // "v": an SSE/AVX register
#else
  (void)v;
#endif
}
template <class V>
inline void storev(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// Scratch, uninitialised. Not std::vector: its out-of-line members, compiled here with this
// file's instruction set, would be weak symbols the linker may pick for every other file too (an
// AVX-512 resize run on a CPU without it).
template <class T>
class ScratchOf {
 public:
  ScratchOf() = default;
  ScratchOf(const ScratchOf&) = delete;
  ScratchOf& operator=(const ScratchOf&) = delete;
  ~ScratchOf() { delete[] p_; }
  void resize(size_t n) {  // the old contents are lost when it grows
    if (n > cap_) {
      delete[] p_;
      p_ = new T[n];
      cap_ = n;
    }
  }
  void resize_keep(size_t n, size_t keep) {  // grows keeping the first `keep` elements
    if (n > cap_) {
      const size_t cap = std::max(n, 2 * cap_);
      T* q = new T[cap];
      std::copy(p_, p_ + keep, q);
      delete[] p_;
      p_ = q;
      cap_ = cap;
    }
  }
  T* data() { return p_; }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t cap_ = 0;
};
using Scratch = ScratchOf<float>;

// Quantized blocks that several tokens of a call read (a prompt chunk's, a draft tree's, or the
// prefix that requests share through the prefix cache) are dequantized once per call and
// thread, not once per token: each token read its whole context again (TinyLlama shape, kv4, a
// 1024-token prompt: prefill at 275 tokens/s against 413 with a float cache, and every draft row
// 1.4 ms dearer). The floats are those the token would have dequantized itself, so nothing
// changes but the time. A block only one token reads is left to the caller's small buffers,
// which stay in L1.
class DequantMemo {
 public:
  // Before a call over items [item_begin, item_end): which physical blocks two or more of its
  // tokens read quantized (the blocks before a token's own, from its window's start).
  void begin(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
    for (int64_t i = 0; i < touched_n_; ++i) {
      const size_t blk = static_cast<size_t>(touched_[static_cast<size_t>(i)]);
      reads_[blk] = 0, dense_[blk] = -1;
    }
    touched_n_ = used_ = cap_ = 0;
    if (!p.kv_bits || item_end <= item_begin) return;
    nkv_ = p.num_kv_heads;
    floats_ = static_cast<int64_t>(p.block_size) * p.head_dim;
    const int64_t t0 = item_begin / nkv_, t1 = (item_end - 1) / nkv_;
    for (int64_t t = t0; t <= t1; ++t) {
      const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
      const int32_t pos = p.positions[t], first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
      for (int32_t b = first / p.block_size; b < pos / p.block_size; ++b) {
        const int32_t blk = table[b];
        if (static_cast<size_t>(blk) >= blocks_) grow(static_cast<size_t>(blk) + 1);
        if (reads_[static_cast<size_t>(blk)]++ == 0) {
          touched_.resize_keep(static_cast<size_t>(touched_n_) + 1, static_cast<size_t>(touched_n_));
          touched_[static_cast<size_t>(touched_n_++)] = blk;
        }
      }
    }
    int32_t shared = 0;
    for (int64_t i = 0; i < touched_n_; ++i) {
      const size_t blk = static_cast<size_t>(touched_[static_cast<size_t>(i)]);
      if (reads_[blk] > 1) dense_[blk] = shared++;
    }
    const int64_t slots = static_cast<int64_t>(shared) * nkv_;
    slot_.resize(static_cast<size_t>(slots));
    for (int64_t i = 0; i < slots; ++i) slot_[static_cast<size_t>(i)] = -1;
    cap_ = std::min<int64_t>(slots, kMaxFloats / (2 * floats_));
    k_.resize(static_cast<size_t>(cap_ * floats_));
    v_.resize(static_cast<size_t>(cap_ * floats_));
  }
  // Physical block blk's K (transposed, as in the float pool) and V for kv head kvh from record
  // rec, or false (one token reads it, or no room: the caller dequantizes it itself).
  bool get(const KvqLayout& lay, const uint8_t* rec, int32_t blk, int kvh, const float** k, const float** v) {
    if (static_cast<size_t>(blk) >= blocks_ || dense_[static_cast<size_t>(blk)] < 0) return false;
    int32_t& s = slot_[static_cast<size_t>(static_cast<int64_t>(dense_[static_cast<size_t>(blk)]) * nkv_ + kvh)];
    if (s < 0) {
      if (used_ == cap_) return false;
      s = static_cast<int32_t>(used_++);
      dequantize_k(lay, rec, k_.data() + s * floats_);
      dequantize_v(lay, rec, v_.data() + s * floats_);
    }
    *k = k_.data() + s * floats_;
    *v = v_.data() + s * floats_;
    return true;
  }

 private:
  static constexpr int64_t kMaxFloats = int64_t{8} << 20;  // 32 MB a thread; past it, per token
  void grow(size_t n) {
    n = std::max(n, 2 * blocks_);
    reads_.resize_keep(n, blocks_);
    dense_.resize_keep(n, blocks_);
    for (size_t i = blocks_; i < n; ++i) reads_[i] = 0, dense_[i] = -1;
    blocks_ = n;
  }
  // Per block id up to the largest seen: reads in this call, and its index among the shared
  // blocks (-1: not shared); the entries a call set are cleared by the next begin().
  ScratchOf<int32_t> reads_, dense_;
  ScratchOf<int32_t> touched_;  // blocks this call reads
  ScratchOf<int32_t> slot_;     // [shared block][kv head]: index into k_ and v_, or -1
  Scratch k_, v_;
  size_t blocks_ = 0;
  int64_t touched_n_ = 0;
  int nkv_ = 0;
  int64_t floats_ = 0, cap_ = 0, used_ = 0;
};

// The maximum of x[0, n) (-inf when empty). Maximum is exact whatever the order, so 16 lanes
// that the compiler vectorises give the same value as a sequential scan (finite inputs).
inline float max_of(const float* x, int n) {
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = -INFINITY;
  int j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
  for (; j < n; ++j) m[0] = x[j] > m[0] ? x[j] : m[0];
  float r = m[0];
  for (int l = 1; l < 16; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// part[(base + j) mod 16] += x[j] for j in [lo, hi], in increasing j: each partial sum receives
// its positions in order, so where a position's value comes from (a block lane or a draft extra)
// does not change the result.
inline void add_by_position(float* part, const float* x, int lo, int hi, int base) {
  int j = lo;
  for (; j <= hi && ((base + j) & 15) != 0; ++j) part[(base + j) & 15] += x[j];
  for (; j + 15 <= hi; j += 16)
    for (int l = 0; l < 16; ++l) part[l] += x[j + l];
  for (; j <= hi; ++j) part[(base + j) & 15] += x[j];
}

inline float sum_tree16(const float* part) {
  float t8[8], t4[4];
  for (int l = 0; l < 8; ++l) t8[l] = part[l] + part[l + 8];
  for (int l = 0; l < 4; ++l) t4[l] = t8[l] + t8[l + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

// How many of a draft token's first extras (n of them, at extra_slots, for positions pos - n + 1 ..
// pos) sit where their positions put them in the sequence's own blocks: a chain the scheduler
// drafted in order (node i at the slot of position root + 1 + i). Those are read in order, as
// the context is: a position's arithmetic does not depend on where it is read from, so the bits
// are the same, without staging the lanes one at a time. Float caches only: a quantized cache
// reads the blocks before a token's own from their records, which hold no draft K/V.
inline int extras_in_order(const AttentionParams& p, const int32_t* table, int32_t pos, int n,
                           const int64_t* extra_slots) {
  if (p.kv_bits) return 0;
  const int bs = p.block_size;
  int k = 0;
  for (; k < n; ++k) {
    const int32_t j = pos - n + 1 + k;
    if (static_cast<int64_t>(table[j / bs]) * bs + j % bs != extra_slots[k]) break;
  }
  return k;
}

// HD and BS are the head dim and block size when known at compile time (the common shapes get
// their own instantiation, with the accumulators in registers), or 0 to read them from p. The
// summation order is fixed per instantiation, and the instantiation depends only on the model's
// shape, so every token of a model is computed the same way.
template <int HD, int BS>
void attend_items_t(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int group = p.num_heads / p.num_kv_heads;
  const int hd = HD ? HD : p.head_dim, bs = BS ? BS : p.block_size;
  const int64_t head_floats = static_cast<int64_t>(bs) * hd;  // one head's slice of a block
  // Per thread, kept between calls: a call may cover only a token's kv heads.
  thread_local Scratch scores, extra_scores, partial, kbuf, vbuf;
  thread_local ScratchOf<const float*> vrows;  // per block of the range: its V (quantized blocks)
  thread_local DequantMemo memo;
  memo.begin(p, item_begin, item_end);
  partial.resize(4 * static_cast<size_t>(bs));
  // Quantized blocks are dequantized once per (token, kv head): K into kbuf as each block is
  // scored, V into vbuf (every block of the range) for the weighted sum; or once per call where
  // several tokens of a sequence read them (DequantMemo).
  const KvqLayout lay = kvq_layout(p.kv_bits, hd, bs);
  kbuf.resize(p.kv_bits ? head_floats : 0);
  auto pool_block = [&](int32_t block) -> int64_t { return p.stage_of_block ? p.stage_of_block[block] : block; };
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t t = item / p.num_kv_heads;
    const int kvh = static_cast<int>(item % p.num_kv_heads);
    const int32_t pos = p.positions[t];
    const int32_t* table = p.block_tables + p.block_table_offset[p.seq_of_token[t]];
    const int32_t first = p.window > 0 ? std::max<int32_t>(0, pos - p.window + 1) : 0;
    // A draft token reads the context in order up to its tree root, then its ancestors and itself
    // from their own slots (positions last + 1 .. pos, in that order).
    int n_extra = p.extra_offset ? p.extra_offset[t + 1] - p.extra_offset[t] : 0;
    const int64_t* extra_slots = n_extra ? p.extra_slots + p.extra_offset[t] : nullptr;
    if (n_extra) {
      const int k = extras_in_order(p, table, pos, n_extra, extra_slots);
      n_extra -= k, extra_slots += k;
    }
    const int32_t last = pos - n_extra;
    const bool in_order = last >= first;
    const int32_t b0 = first / bs, b1 = in_order ? last / bs : b0 - 1;
    const int64_t span = static_cast<int64_t>(b1 - b0 + 1) * bs;  // lanes per head
    const int32_t lo = first - b0 * bs, hi = last - b0 * bs;         // valid lanes [lo, hi]
    const int extra_first = std::max(0, first - (last + 1));         // extras before the window start
    scores.resize(static_cast<size_t>(std::max<int64_t>(span, 0)) * group);
    const int32_t own_block = pos / bs;  // blocks before it are read quantized (kv_bits != 0)
    if (p.kv_bits) {
      vbuf.resize(static_cast<size_t>(std::max<int64_t>(span, 0)) * hd);
      vrows.resize(static_cast<size_t>(std::max(b1 - b0 + 1, 0)));
    }
    extra_scores.resize(static_cast<size_t>(n_extra) * group);
    const float* q0 = p.q + t * p.ldq + static_cast<int64_t>(kvh) * group * hd;
    auto head_base = [&](int64_t slot, const float* cache) {
      return cache + ((slot / bs) * p.num_kv_heads + kvh) * head_floats;
    };

    // Scores of every lane of every block: s[j] = sum_i q[i] * K^T[i][j]. The extras repeat the
    // very same arithmetic one lane at a time, so a draft token's scores equal the plain ones.
    for (int32_t b = b0; b <= b1; ++b) {
      const float* kt;
      if (p.kv_bits && b < own_block) {
        const uint8_t* rec = p.kv_records + (static_cast<int64_t>(table[b]) * p.num_kv_heads + kvh) * lay.bytes;
        const float*& vr = vrows[static_cast<size_t>(b - b0)];
        if (!memo.get(lay, rec, table[b], kvh, &kt, &vr)) {
          float* vq = vbuf.data() + static_cast<int64_t>(b - b0) * head_floats;
          dequantize_k(lay, rec, kbuf.data());
          dequantize_v(lay, rec, vq);
          kt = kbuf.data(), vr = vq;
        }
      } else {
        kt = p.k_cache + (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
      }
      int g0 = 0;
      if constexpr (HD > 0 && BS == 16 && HD % 4 == 0) {
        // Four partial sums per head (channels i mod 4), each one 16-lane vector, for as many
        // heads at a time as their accumulators fit the registers (up to four: each K row loaded
        // once for all of them, 16 independent chains).
        auto score_heads = [&](auto nh) {
          constexpr int NH = decltype(nh)::value;
          const float* q[NH];
          for (int x = 0; x < NH; ++x) q[x] = q0 + static_cast<int64_t>(g0 + x) * hd;
          V16 acc[NH][4] = {};
#pragma GCC unroll 4
          for (int i = 0; i < HD; i += 4)
            for (int u = 0; u < 4; ++u) {
              const V16 k = load16(kt + static_cast<int64_t>(i + u) * 16);
              for (int x = 0; x < NH; ++x) acc[x][u] += q[x][i + u] * k;
            }
          for (int x = 0; x < NH; ++x)
            store16(scores.data() + (g0 + x) * span + static_cast<int64_t>(b - b0) * bs,
                    (acc[x][0] + acc[x][1]) + (acc[x][2] + acc[x][3]));
          g0 += NH;
        };
        constexpr int kHeads = std::min(4, std::max(1, kAccRegisters / (4 * kV16Registers)));
        if constexpr (kHeads >= 4)
          while (group - g0 >= 4) score_heads(std::integral_constant<int, 4>());
        if constexpr (kHeads >= 2)
          while (group - g0 >= 2) score_heads(std::integral_constant<int, 2>());
        while (group - g0 >= 1) score_heads(std::integral_constant<int, 1>());
      }
      for (int g = g0; g < group; ++g) {
        const float* q = q0 + static_cast<int64_t>(g) * hd;
        float* s = scores.data() + g * span + static_cast<int64_t>(b - b0) * bs;
        if (hd % 4 == 0) {
          // The same four partial sums with the block size known only at run time.
          float* acc = partial.data();
          std::fill(acc, acc + 4 * bs, 0.0f);
          for (int i = 0; i < hd; i += 4)
            for (int u = 0; u < 4; ++u) {
              const float qi = q[i + u];
              const float* row = kt + static_cast<int64_t>(i + u) * bs;
              for (int j = 0; j < bs; ++j) acc[u * bs + j] += qi * row[j];
            }
          for (int j = 0; j < bs; ++j) s[j] = (acc[j] + acc[bs + j]) + (acc[2 * bs + j] + acc[3 * bs + j]);
        } else {
          for (int j = 0; j < bs; ++j) s[j] = 0.0f;
          for (int i = 0; i < hd; ++i) {
            const float qi = q[i];
            const float* row = kt + static_cast<int64_t>(i) * bs;
            for (int j = 0; j < bs; ++j) s[j] += qi * row[j];
          }
        }
      }
    }
    for (int e = 0; e < n_extra; ++e) {
      const float* kt = head_base(extra_slots[e], p.k_cache) + extra_slots[e] % bs;  // channel i at kt[i * bs]
      for (int g = 0; g < group; ++g) {
        const float* q = q0 + static_cast<int64_t>(g) * hd;
        float& s = extra_scores[static_cast<size_t>(g) * n_extra + e];
        if (hd % 4 == 0) {
          float acc[4] = {};
          for (int i = 0; i < hd; i += 4)
            for (int u = 0; u < 4; ++u) acc[u] += q[i + u] * kt[static_cast<int64_t>(i + u) * bs];
          s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        } else {
          s = 0.0f;
          for (int i = 0; i < hd; ++i) s += q[i] * kt[static_cast<int64_t>(i) * bs];
        }
      }
    }

    float* out0 = p.out + t * static_cast<int64_t>(p.num_heads) * hd + static_cast<int64_t>(kvh) * group * hd;
    for (int g = 0; g < group; ++g) {
      float* s = scores.data() + g * span;
      float* xs = extra_scores.data() + static_cast<size_t>(g) * n_extra;
      // Softmax over the valid lanes and the extras. The maximum is exact in any order; the sum
      // runs in 16 partial sums keyed by position mod 16, each in position order, then a fixed
      // tree: vectorisable, and the same for a draft token as for the plain one. The weights
      // e / sum replace the scores.
      for (int32_t j = lo; j <= hi; ++j) s[j] *= p.scale;
      for (int e = extra_first; e < n_extra; ++e) xs[e] *= p.scale;
      float mx = std::max(max_of(s + lo, hi - lo + 1), max_of(xs + extra_first, n_extra - extra_first));
      for (int32_t j = lo; j <= hi; ++j) s[j] = exp_approx(s[j] - mx);
      for (int e = extra_first; e < n_extra; ++e) xs[e] = exp_approx(xs[e] - mx);
      float part[16] = {};
      add_by_position(part, s, lo, hi, b0 * bs);
      add_by_position(part, xs, extra_first, n_extra - 1, last + 1);
      const float inv = 1.0f / sum_tree16(part);
      for (int32_t j = lo; j <= hi; ++j) s[j] *= inv;
      for (int e = extra_first; e < n_extra; ++e) xs[e] *= inv;
    }
    // The in-order lanes block by block: one table lookup per block, its rows contiguous; fn gets
    // the block's first position, its V rows, its first lane in the scores and its valid lanes.
    auto for_each_block = [&](auto&& fn) {
      for (int32_t b = b0; b <= b1; ++b) {
        const int32_t base = (b - b0) * bs;
        const int32_t la = std::max(lo - base, 0), lz = std::min(hi - base, bs - 1);
        if (la > lz) continue;
        const float* vb = p.kv_bits && b < own_block ? vrows[static_cast<size_t>(b - b0)]
                                                     : p.v_cache + (pool_block(table[b]) * p.num_kv_heads + kvh) * head_floats;
        fn(b * bs, vb, base, la, lz);
      }
    };
    auto extra_v_row = [&](int e) { return head_base(extra_slots[e], p.v_cache) + (extra_slots[e] % bs) * hd; };
    auto weights = [&](int g) { return scores.data() + g * span; };
    auto extra_weights = [&](int g) { return extra_scores.data() + static_cast<size_t>(g) * n_extra; };
    if constexpr (HD == 8 && BS == 16) {
      // Head dim 8: an even and the following odd row of a block are one 16-float vector, so its
      // low half accumulates the even positions and its high half the odd ones: the products and
      // sums of two 8-lane accumulators, half the instructions. A lone lane (a block's edge, a
      // draft extra) goes through memory into its half, with the same scalar arithmetic.
      for (int g = 0; g < group; ++g) {
        const float *s = weights(g), *xs = extra_weights(g);
        V16 acc = {};
        auto add_half = [&](int32_t position, const float* v, float w) {
          float a[16];
          store16(a, acc);
          float* h = a + 8 * (position & 1);
          for (int i = 0; i < 8; ++i) h[i] += w * v[i];
          acc = load16(a);
        };
        for_each_block([&](int32_t abs0, const float* vb, int32_t base, int32_t la, int32_t lz) {
          const float* sb = s + base;
          int32_t l = la;
          if (l & 1) add_half(abs0 + l, vb + 8 * l, sb[l]), ++l;
          for (; l + 1 <= lz; l += 2) {
            const float we = sb[l], wo = sb[l + 1];
            const V16 w = pair16(we, wo);
            acc += w * load16(vb + 8 * l);
          }
          if (l <= lz) add_half(abs0 + l, vb + 8 * l, sb[l]);
        });
        for (int e = extra_first; e < n_extra; ++e) add_half(last + 1 + e, extra_v_row(e), xs[e]);
        float a[16];
        store16(a, acc);
        float* o = out0 + static_cast<int64_t>(g) * hd;
        for (int i = 0; i < 8; ++i) o[i] = a[i] + a[8 + i];
      }
    } else if constexpr (HD > 0 && HD % 8 == 0) {
      // Register accumulators, one set for even and one for odd positions: independent chains;
      // two heads at a time where their accumulators fit the registers (each V row loaded once
      // for both), else one head, its channels in as many passes as the registers need. Every
      // channel's additions are the same, in the same order, either way.
      using V = std::conditional_t<kRegisterBytes == 64 && HD % 16 != 0, V8, VNative>;
      constexpr int kWidth = sizeof(V) / sizeof(float), kVecs = HD / kWidth;
      constexpr int kHeads = 2 * 2 * kVecs <= kAccRegisters ? 2 : 1;
      constexpr int kChunk = std::min(kVecs, kAccRegisters / (2 * kHeads));  // vectors per pass
      static_assert(kVecs % kChunk == 0);
      auto heads = [&](int g0, auto nh, int c0) {  // channels [kWidth * c0, kWidth * (c0 + kChunk))
        constexpr int NH = decltype(nh)::value;
        const float* s[NH];
        const float* xs[NH];
        for (int x = 0; x < NH; ++x) s[x] = weights(g0 + x), xs[x] = extra_weights(g0 + x);
        V even[NH][kChunk] = {}, odd[NH][kChunk] = {};
        auto accumulate = [&](int x, int32_t position, const float* v, float w) {
          v += kWidth * c0;
          if (position & 1) {
#pragma GCC unroll 8
            for (int c = 0; c < kChunk; ++c) odd[x][c] += w * loadv<V>(v + kWidth * c);
          } else {
#pragma GCC unroll 8
            for (int c = 0; c < kChunk; ++c) even[x][c] += w * loadv<V>(v + kWidth * c);
          }
        };
        // Two lanes at a time (one even, one odd position): no branch in the hot loop, the same
        // additions in the same order as one position at a time.
        for_each_block([&](int32_t abs0, const float* vb, int32_t base, int32_t la, int32_t lz) {
          int32_t l = la;
          if ((abs0 + l) & 1) {
            for (int x = 0; x < NH; ++x) accumulate(x, abs0 + l, vb + l * hd, s[x][base + l]);
            ++l;
          }
          for (; l + 1 <= lz; l += 2) {
            const float* ve = vb + l * hd + kWidth * c0;
            const float* vo = ve + hd;
#pragma GCC unroll 8
            for (int c = 0; c < kChunk; ++c) {
              V e = loadv<V>(ve + kWidth * c), o = loadv<V>(vo + kWidth * c);
              pin(e), pin(o);
              for (int x = 0; x < NH; ++x) {
                even[x][c] += s[x][base + l] * e;
                odd[x][c] += s[x][base + l + 1] * o;
              }
            }
          }
          if (l <= lz)
            for (int x = 0; x < NH; ++x) accumulate(x, abs0 + l, vb + l * hd, s[x][base + l]);
        });
        for (int e = extra_first; e < n_extra; ++e)
          for (int x = 0; x < NH; ++x) accumulate(x, last + 1 + e, extra_v_row(e), xs[x][e]);
        for (int x = 0; x < NH; ++x)
#pragma GCC unroll 8
          for (int c = 0; c < kChunk; ++c)
            storev(out0 + static_cast<int64_t>(g0 + x) * hd + kWidth * (c0 + c), even[x][c] + odd[x][c]);
      };
      int g = 0;
      if constexpr (kHeads == 2)
        for (; g + 2 <= group; g += 2) heads(g, std::integral_constant<int, 2>(), 0);
      for (; g < group; ++g)
        for (int c0 = 0; c0 < kVecs; c0 += kChunk) heads(g, std::integral_constant<int, 1>(), c0);
    } else {
      for (int g = 0; g < group; ++g) {
        const float *s = weights(g), *xs = extra_weights(g);
        float* o = out0 + static_cast<int64_t>(g) * hd;
        for (int i = 0; i < hd; ++i) o[i] = 0.0f;
        for_each_block([&](int32_t, const float* vb, int32_t base, int32_t la, int32_t lz) {
          for (int32_t l = la; l <= lz; ++l) {
            const float* v = vb + l * hd;
            const float w = s[base + l];
            for (int i = 0; i < hd; ++i) o[i] += w * v[i];
          }
        });
        for (int e = extra_first; e < n_extra; ++e) {
          const float* v = extra_v_row(e);
          const float w = xs[e];
          for (int i = 0; i < hd; ++i) o[i] += w * v[i];
        }
      }
    }
  }
}

// The arithmetic depends on the head dim only (block size 16 merely runs it in registers), so a
// model computes the same bits whatever its block size.
template <int HD>
inline void attend_items_hd(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  if (p.block_size == 16) return attend_items_t<HD, 16>(p, item_begin, item_end);
  attend_items_t<HD, 0>(p, item_begin, item_end);
}

inline void attend_items(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  switch (p.head_dim) {
    case 8: return attend_items_hd<8>(p, item_begin, item_end);
    case 16: return attend_items_hd<16>(p, item_begin, item_end);
    case 32: return attend_items_hd<32>(p, item_begin, item_end);
    case 64: return attend_items_hd<64>(p, item_begin, item_end);
    case 128: return attend_items_hd<128>(p, item_begin, item_end);
    case 256: return attend_items_hd<256>(p, item_begin, item_end);
    default: return attend_items_t<0, 0>(p, item_begin, item_end);  // head dims that are not a multiple of 8
  }
}
