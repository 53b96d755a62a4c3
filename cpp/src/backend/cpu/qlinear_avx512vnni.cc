// W4A8 kernel with AVX-512 VNNI (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// -mfma): one vpdpbusd per 4 channels of a 16-row block.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>

#include "backend/cpu/ops.h"
#include "quant/q4.h"

namespace accelcore::cpu {
namespace {

inline __m512i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

// The assembly loops' step prologue: the 64 bytes at w0 and at w1 (one 8-channel step of two
// 16-row blocks) as 4-bit lanes, low nibbles (channels 0-3) in zmm16 / zmm18 and high ones
// (channels 4-7) in zmm17 / zmm19, and a prefetch of each stream 2 KB (PF steps) ahead.
#define ACCEL_UNPACK_TWO_BLOCKS                      \
  "vpsrlw $4, (%[w0]), %%zmm17\n\t"                 \
  "vpandd (%[w0]), %[mask], %%zmm16\n\t"            \
  "vpsrlw $4, (%[w1]), %%zmm19\n\t"                 \
  "vpandd (%[w1]), %[mask], %%zmm18\n\t"            \
  "prefetcht0 2048(%[w0])\n\t"                      \
  "prefetcht0 2048(%[w1])\n\t"                      \
  "vpandd %[mask], %%zmm17, %%zmm17\n\t"            \
  "vpandd %[mask], %%zmm19, %%zmm19\n\t"

// The same for W8A8 on split 8-bit weights: the step's 8-bit weights 16 h + l from the high
// halves at w0 / w1 and the low ones at l0 / l1 (each byte: channel c in its low nibble, c + 4 in
// its high one), channels 0-3 in zmm16 / zmm18 and 4-7 in zmm17 / zmm19, each a bitwise select
// under maskhi (0xF0 in every byte): (h << 4) or l for channels 0-3, h or (l >> 4) for 4-7.
#define ACCEL_COMBINE_BLOCK(w, l, lo, hi)                   \
  "vpsllw $4, (%[" w "]), %%zmm" lo "\n\t"               \
  "vpternlogd $0xE2, (%[" l "]), %[maskhi], %%zmm" lo "\n\t" \
  "vpsrlw $4, (%[" l "]), %%zmm20\n\t"                  \
  "vmovdqu64 (%[" w "]), %%zmm" hi "\n\t"                 \
  "vpternlogd $0xE2, %%zmm20, %[maskhi], %%zmm" hi "\n\t"
#define ACCEL_COMBINE_TWO_BLOCKS        \
  ACCEL_COMBINE_BLOCK("w0", "l0", "16", "17") \
  ACCEL_COMBINE_BLOCK("w1", "l1", "18", "19") \
  "prefetcht0 2048(%[w0])\n\t"        \
  "prefetcht0 2048(%[l0])\n\t"        \
  "prefetcht0 2048(%[w1])\n\t"        \
  "prefetcht0 2048(%[l1])\n\t"

// Zeroing of the accumulator registers the loops use.
#define ACCEL_ZERO_ZMM0_7              \
  "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"  \
  "vpxord %%zmm1, %%zmm1, %%zmm1\n\t"  \
  "vpxord %%zmm2, %%zmm2, %%zmm2\n\t"  \
  "vpxord %%zmm3, %%zmm3, %%zmm3\n\t"  \
  "vpxord %%zmm4, %%zmm4, %%zmm4\n\t"  \
  "vpxord %%zmm5, %%zmm5, %%zmm5\n\t"  \
  "vpxord %%zmm6, %%zmm6, %%zmm6\n\t"  \
  "vpxord %%zmm7, %%zmm7, %%zmm7\n\t"
#define ACCEL_ZERO_ZMM8_15                \
  "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"     \
  "vpxord %%zmm9, %%zmm9, %%zmm9\n\t"     \
  "vpxord %%zmm10, %%zmm10, %%zmm10\n\t"  \
  "vpxord %%zmm11, %%zmm11, %%zmm11\n\t"  \
  "vpxord %%zmm12, %%zmm12, %%zmm12\n\t"  \
  "vpxord %%zmm13, %%zmm13, %%zmm13\n\t"  \
  "vpxord %%zmm14, %%zmm14, %%zmm14\n\t"  \
  "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"

// The 2-block by 8-row step loop (asm_steps, asm_group): zmm0-7 and zmm8-15 the two blocks' 8
// rows, the steps' weights at w0 / w1, rows 0-3 at xa + {0, 1, 2, 3} * k and rows 4-7 at xb.
// PROLOGUE puts a step's weights in zmm16-19 (as ACCEL_UNPACK_TWO_BLOCKS does), ADVANCE moves the
// weight pointers to the next step.
#define ACCEL_LOOP_2X8(PROLOGUE, ADVANCE) \
  ACCEL_ZERO_ZMM0_7 \
  ACCEL_ZERO_ZMM8_15 \
  "1:\n\t" \
  PROLOGUE \
  "vpbroadcastd (%[xa]), %%zmm21\n\t" \
  "vpdpbusd %%zmm21, %%zmm16, %%zmm0\n\t" \
  "vpdpbusd %%zmm21, %%zmm18, %%zmm8\n\t" \
  "vpbroadcastd (%[xa],%[k]), %%zmm22\n\t" \
  "vpdpbusd %%zmm22, %%zmm16, %%zmm1\n\t" \
  "vpdpbusd %%zmm22, %%zmm18, %%zmm9\n\t" \
  "vpbroadcastd (%[xa],%[k],2), %%zmm23\n\t" \
  "vpdpbusd %%zmm23, %%zmm16, %%zmm2\n\t" \
  "vpdpbusd %%zmm23, %%zmm18, %%zmm10\n\t" \
  "vpbroadcastd (%[xa],%[k3]), %%zmm24\n\t" \
  "vpdpbusd %%zmm24, %%zmm16, %%zmm3\n\t" \
  "vpdpbusd %%zmm24, %%zmm18, %%zmm11\n\t" \
  "vpbroadcastd (%[xb]), %%zmm25\n\t" \
  "vpdpbusd %%zmm25, %%zmm16, %%zmm4\n\t" \
  "vpdpbusd %%zmm25, %%zmm18, %%zmm12\n\t" \
  "vpbroadcastd (%[xb],%[k]), %%zmm26\n\t" \
  "vpdpbusd %%zmm26, %%zmm16, %%zmm5\n\t" \
  "vpdpbusd %%zmm26, %%zmm18, %%zmm13\n\t" \
  "vpbroadcastd (%[xb],%[k],2), %%zmm21\n\t" \
  "vpdpbusd %%zmm21, %%zmm16, %%zmm6\n\t" \
  "vpdpbusd %%zmm21, %%zmm18, %%zmm14\n\t" \
  "vpbroadcastd (%[xb],%[k3]), %%zmm22\n\t" \
  "vpdpbusd %%zmm22, %%zmm16, %%zmm7\n\t" \
  "vpdpbusd %%zmm22, %%zmm18, %%zmm15\n\t" \
  "vpbroadcastd 4(%[xa]), %%zmm23\n\t" \
  "vpdpbusd %%zmm23, %%zmm17, %%zmm0\n\t" \
  "vpdpbusd %%zmm23, %%zmm19, %%zmm8\n\t" \
  "vpbroadcastd 4(%[xa],%[k]), %%zmm24\n\t" \
  "vpdpbusd %%zmm24, %%zmm17, %%zmm1\n\t" \
  "vpdpbusd %%zmm24, %%zmm19, %%zmm9\n\t" \
  "vpbroadcastd 4(%[xa],%[k],2), %%zmm25\n\t" \
  "vpdpbusd %%zmm25, %%zmm17, %%zmm2\n\t" \
  "vpdpbusd %%zmm25, %%zmm19, %%zmm10\n\t" \
  "vpbroadcastd 4(%[xa],%[k3]), %%zmm26\n\t" \
  "vpdpbusd %%zmm26, %%zmm17, %%zmm3\n\t" \
  "vpdpbusd %%zmm26, %%zmm19, %%zmm11\n\t" \
  "vpbroadcastd 4(%[xb]), %%zmm21\n\t" \
  "vpdpbusd %%zmm21, %%zmm17, %%zmm4\n\t" \
  "vpdpbusd %%zmm21, %%zmm19, %%zmm12\n\t" \
  "vpbroadcastd 4(%[xb],%[k]), %%zmm22\n\t" \
  "vpdpbusd %%zmm22, %%zmm17, %%zmm5\n\t" \
  "vpdpbusd %%zmm22, %%zmm19, %%zmm13\n\t" \
  "vpbroadcastd 4(%[xb],%[k],2), %%zmm23\n\t" \
  "vpdpbusd %%zmm23, %%zmm17, %%zmm6\n\t" \
  "vpdpbusd %%zmm23, %%zmm19, %%zmm14\n\t" \
  "vpbroadcastd 4(%[xb],%[k3]), %%zmm24\n\t" \
  "vpdpbusd %%zmm24, %%zmm17, %%zmm7\n\t" \
  "vpdpbusd %%zmm24, %%zmm19, %%zmm15\n\t" \
  ADVANCE \
  "add $8, %[xa]\n\t" \
  "add $8, %[xb]\n\t" \
  "dec %[n]\n\t" \
  "jnz 1b\n\t"
#define ACCEL_STEPS_2X8 ACCEL_LOOP_2X8(ACCEL_UNPACK_TWO_BLOCKS, "add $64, %[w0]\n\tadd $64, %[w1]\n\t")
#define ACCEL_STEPS_2X8_W8 \
  ACCEL_LOOP_2X8(ACCEL_COMBINE_TWO_BLOCKS, "add $64, %[w0]\n\tadd $64, %[w1]\n\tadd $64, %[l0]\n\tadd $64, %[l1]\n\t")

// finish() of row i's accumulator zmm`acc` in block nb, in place, from the GroupFinish at f (its
// zero points widened in zmm16 + nb, its scales in zmm18 + nb, its y row pointer in yreg):
// y = fma(sw * sx, float(acc - z * xsum), y), the same operations as finish().
#define ACCEL_ZREG0 "16"
#define ACCEL_ZREG1 "17"
#define ACCEL_SWREG0 "18"
#define ACCEL_SWREG1 "19"
#define ACCEL_FINISH(acc, nb, i, yreg)                                   \
  "vpmulld 80+4*" #i "(%[f])%{1to16%}, %%zmm" ACCEL_ZREG##nb ", %%zmm20\n\t" \
  "vpsubd %%zmm20, %%zmm" #acc ", %%zmm" #acc "\n\t"                    \
  "vcvtdq2ps %%zmm" #acc ", %%zmm" #acc "\n\t"                          \
  "vmulps 48+4*" #i "(%[f])%{1to16%}, %%zmm" ACCEL_SWREG##nb ", %%zmm20\n\t" \
  "vfmadd213ps 64*" #i "(%[" #yreg "]), %%zmm20, %%zmm" #acc "\n\t"    \
  "vmovups %%zmm" #acc ", 64*" #i "(%[" #yreg "])\n\t"

// After a 2x8 loop: the GroupFinish's zero points and scales into zmm16-19 (the loop's weight
// pointers are free now), then every accumulator finished into its y row.
#define ACCEL_GROUP_FINISH \
  "mov 16(%[f]), %[w0]\n\t" \
  "vpmovzxbd (%[w0]), %%zmm16\n\t" \
  "mov 24(%[f]), %[w0]\n\t" \
  "vpmovzxbd (%[w0]), %%zmm17\n\t" \
  "mov 0(%[f]), %[w0]\n\t" \
  "vmovups (%[w0]), %%zmm18\n\t" \
  "mov 8(%[f]), %[w0]\n\t" \
  "vmovups (%[w0]), %%zmm19\n\t" \
  "mov 32(%[f]), %[xa]\n\t" \
  "mov 40(%[f]), %[xb]\n\t" \
  ACCEL_FINISH(0, 0, 0, xa) ACCEL_FINISH(8, 1, 0, xb) \
  ACCEL_FINISH(1, 0, 1, xa) ACCEL_FINISH(9, 1, 1, xb) \
  ACCEL_FINISH(2, 0, 2, xa) ACCEL_FINISH(10, 1, 2, xb) \
  ACCEL_FINISH(3, 0, 3, xa) ACCEL_FINISH(11, 1, 3, xb) \
  ACCEL_FINISH(4, 0, 4, xa) ACCEL_FINISH(12, 1, 4, xb) \
  ACCEL_FINISH(5, 0, 5, xa) ACCEL_FINISH(13, 1, 5, xb) \
  ACCEL_FINISH(6, 0, 6, xa) ACCEL_FINISH(14, 1, 6, xb) \
  ACCEL_FINISH(7, 0, 7, xa) ACCEL_FINISH(15, 1, 7, xb)

struct Avx512VnniDot {
  static constexpr int kBlocks = 4;  // 16-row blocks per pass: more weight streams in flight (M = 1: 271 -> 162 us)
  static constexpr int kWideBlocks = 2, kWideRows = 8;  // from 8 rows: M = 64 5491 -> 5025 us
  using Acc = __m512i;
  struct W {
    __m512i lo, hi;
  };
  static Acc zero() { return _mm512_setzero_si512(); }
  static W unpack(const uint8_t* w64) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_loadu_si512(w64);
    return {_mm512_and_si512(v, mask), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask)};
  }
  static void dot(Acc& acc, const W& w, const int8_t* x) {
    acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, w.lo, broadcast4(x)), w.hi, broadcast4(x + 4));
  }
  // The 2-block by 8-row pass (every batch of 8 or more rows) in assembly. GCC keeps the 16
  // accumulators of the intrinsic version in registers only with a move per product and spills
  // some every step; here they stay in zmm0-15 for the whole run of steps, each activation quad is
  // broadcast once for both blocks (an embedded-broadcast operand per product measured slower), and
  // the products are the same integers. One layer's linears at M = 16 (qlinear_bench, 2 threads):
  // 1248-1322 -> 1113-1170 us from the caches, 1340-1356 -> 1263-1281 us streamed from memory.
  // Sets acc (not +=: reading acc back right after the caller zeroed it stalls on store forwarding).
  static constexpr int kAsmBlocks = 2, kAsmRows = 8;
  static void asm_steps(Acc (&acc)[2][8], const uint8_t* const (&wg)[2], const int8_t* x, int64_t ldx, int64_t j0,
                        int64_t j1) {
    if (j1 <= j0) {  // never in practice (a sub-group has at least one step); the loop needs one
      for (auto& row : acc)
        for (Acc& a : row) a = zero();
      return;
    }
    const uint8_t* w0 = wg[0] + j0 * 64;
    const uint8_t* w1 = wg[1] + j0 * 64;
    const int8_t* xa = x + 8 * j0;  // rows 0-3: xa + {0, 1, 2, 3} * ldx
    const int8_t* xb = xa + 4 * ldx;  // rows 4-7
    const int64_t k3 = 3 * ldx;
    int64_t n = j1 - j0;
    asm volatile(
        ACCEL_STEPS_2X8
        "vmovdqu64 %%zmm0, 0(%[acc])\n\t"
        "vmovdqu64 %%zmm1, 64(%[acc])\n\t"
        "vmovdqu64 %%zmm2, 128(%[acc])\n\t"
        "vmovdqu64 %%zmm3, 192(%[acc])\n\t"
        "vmovdqu64 %%zmm4, 256(%[acc])\n\t"
        "vmovdqu64 %%zmm5, 320(%[acc])\n\t"
        "vmovdqu64 %%zmm6, 384(%[acc])\n\t"
        "vmovdqu64 %%zmm7, 448(%[acc])\n\t"
        "vmovdqu64 %%zmm8, 512(%[acc])\n\t"
        "vmovdqu64 %%zmm9, 576(%[acc])\n\t"
        "vmovdqu64 %%zmm10, 640(%[acc])\n\t"
        "vmovdqu64 %%zmm11, 704(%[acc])\n\t"
        "vmovdqu64 %%zmm12, 768(%[acc])\n\t"
        "vmovdqu64 %%zmm13, 832(%[acc])\n\t"
        "vmovdqu64 %%zmm14, 896(%[acc])\n\t"
        "vmovdqu64 %%zmm15, 960(%[acc])"
        : [w0] "+r"(w0), [w1] "+r"(w1), [xa] "+r"(xa), [xb] "+r"(xb), [n] "+r"(n)
        : [acc] "r"(&acc[0][0]), [mask] "v"(_mm512_set1_epi8(0x0F)), [k] "r"(ldx), [k3] "r"(k3)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm21", "xmm22", "xmm23",
          "xmm24", "xmm25", "xmm26", "cc", "memory");
  }
  // W4A8's whole group for the 2-block by 8-row pass: the steps, then each accumulator finished
  // into its y row straight from its register (finishing in C++ stored and reloaded all 16 and
  // kept GCC's scalars on the stack: a third of the kernel's time at M = 16). The operands of
  // finish() for the pass, gathered by the caller; the offsets are the assembly's.
  struct GroupFinish {
    const float* sw[2];   // the blocks' 16 weight scales
    const uint8_t* z[2];  // and zero points
    float* y[2];          // row 0 of the pass's 8 y rows per block (64 bytes apart)
    float sx[8];          // the rows' activation scales
    int32_t xsum[8];      // and sums
  };
  static void asm_group(const uint8_t* const (&wg)[2], const int8_t* x, int64_t ldx, int64_t steps,
                        const GroupFinish& f) {
    static_assert(offsetof(GroupFinish, z) == 16 && offsetof(GroupFinish, y) == 32 &&
                  offsetof(GroupFinish, sx) == 48 && offsetof(GroupFinish, xsum) == 80);
    const uint8_t* w0 = wg[0];
    const uint8_t* w1 = wg[1];
    const int8_t* xa = x;
    const int8_t* xb = xa + 4 * ldx;
    const int64_t k3 = 3 * ldx;
    int64_t n = steps;  // at least 4: a group has at least 32 channels
    asm volatile(
        ACCEL_STEPS_2X8
        ACCEL_GROUP_FINISH
        : [w0] "+r"(w0), [w1] "+r"(w1), [xa] "+r"(xa), [xb] "+r"(xb), [n] "+r"(n)
        : [f] "r"(&f), [mask] "v"(_mm512_set1_epi8(0x0F)), [k] "r"(ldx), [k3] "r"(k3)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
          "xmm23", "xmm24", "xmm25", "xmm26", "cc", "memory");
  }
  // asm_group for W8A8 on split 8-bit weights: the high halves at wh, the low ones at wl (f holds
  // the low halves' scales and the combined zero points).
  static constexpr bool kW8Combined = true;
  static void asm_group_w8(const uint8_t* const (&wh)[2], const uint8_t* const (&wl)[2], const int8_t* x,
                           int64_t ldx, int64_t steps, const GroupFinish& f) {
    const uint8_t* w0 = wh[0];
    const uint8_t* w1 = wh[1];
    const uint8_t* l0 = wl[0];
    const uint8_t* l1 = wl[1];
    const int8_t* xa = x;
    const int8_t* xb = xa + 4 * ldx;
    const int64_t k3 = 3 * ldx;
    int64_t n = steps;
    asm volatile(
        ACCEL_STEPS_2X8_W8
        ACCEL_GROUP_FINISH
        : [w0] "+r"(w0), [w1] "+r"(w1), [l0] "+r"(l0), [l1] "+r"(l1), [xa] "+r"(xa), [xb] "+r"(xb), [n] "+r"(n)
        : [f] "r"(&f), [maskhi] "v"(_mm512_set1_epi8(static_cast<char>(0xF0))), [k] "r"(ldx), [k3] "r"(k3)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
          "xmm23", "xmm24", "xmm25", "xmm26", "cc", "memory");
  }
  // The 8-bit weights of a step (16 h + l) from its two halves, as unpack gives 4-bit ones.
  static W unpack8(const uint8_t* h64, const uint8_t* l64) {
    const __m512i maskhi = _mm512_set1_epi8(static_cast<char>(0xF0));
    const __m512i h = _mm512_loadu_si512(h64), l = _mm512_loadu_si512(l64);
    // Bitwise select (0xE2: b ? a : c) of the high nibbles from a, the low ones from c.
    return {_mm512_ternarylogic_epi32(_mm512_slli_epi16(h, 4), maskhi, l, 0xE2),
            _mm512_ternarylogic_epi32(h, maskhi, _mm512_srli_epi16(l, 4), 0xE2)};
  }
  // FMPQ (w4a4) in 2 blocks by 4 rows, in assembly, for its 8-channel sub-groups (one step each):
  // per step, each int32 sum is converted and added into the float sum t with one fma by the
  // sub-group's scale, t = fma(sx, float(acc), t) as accumulate() does, with the 8 float sums and
  // the 8 int32 ones all in registers (the intrinsic 2x8 tile kept t in memory). Sets t to the
  // group's sums over its `steps` steps (x_scales: row i's at sx + i * lds, one per step).
  static constexpr int kSubAsmBlocks = 2, kSubAsmRows = 4;
  static constexpr bool kSubAsmFewerRows = false;
  static void asm_sub_steps(float (&t)[2][4][16], const uint8_t* const (&wg)[2], const int8_t* x, int64_t ldx,
                            const float* sx, int64_t lds, int64_t steps) {
    const uint8_t* w0 = wg[0];
    const uint8_t* w1 = wg[1];
    const int8_t* xa = x;  // rows 0-3: xa + {0, 1, 2, 3} * ldx
    const int64_t k3 = 3 * ldx, ks = lds * 4, ks3 = 3 * ks;
    int64_t n = steps;
    asm volatile(
        ACCEL_ZERO_ZMM0_7
        "1:\n\t"
        ACCEL_UNPACK_TWO_BLOCKS
        ACCEL_ZERO_ZMM8_15
        "vpbroadcastd (%[xa]), %%zmm20\n\t"
        "vpdpbusd %%zmm20, %%zmm16, %%zmm8\n\t"
        "vpdpbusd %%zmm20, %%zmm18, %%zmm12\n\t"
        "vpbroadcastd (%[xa],%[k]), %%zmm21\n\t"
        "vpdpbusd %%zmm21, %%zmm16, %%zmm9\n\t"
        "vpdpbusd %%zmm21, %%zmm18, %%zmm13\n\t"
        "vpbroadcastd (%[xa],%[k],2), %%zmm22\n\t"
        "vpdpbusd %%zmm22, %%zmm16, %%zmm10\n\t"
        "vpdpbusd %%zmm22, %%zmm18, %%zmm14\n\t"
        "vpbroadcastd (%[xa],%[k3]), %%zmm23\n\t"
        "vpdpbusd %%zmm23, %%zmm16, %%zmm11\n\t"
        "vpdpbusd %%zmm23, %%zmm18, %%zmm15\n\t"
        "vpbroadcastd 4(%[xa]), %%zmm20\n\t"
        "vpdpbusd %%zmm20, %%zmm17, %%zmm8\n\t"
        "vpdpbusd %%zmm20, %%zmm19, %%zmm12\n\t"
        "vpbroadcastd 4(%[xa],%[k]), %%zmm21\n\t"
        "vpdpbusd %%zmm21, %%zmm17, %%zmm9\n\t"
        "vpdpbusd %%zmm21, %%zmm19, %%zmm13\n\t"
        "vpbroadcastd 4(%[xa],%[k],2), %%zmm22\n\t"
        "vpdpbusd %%zmm22, %%zmm17, %%zmm10\n\t"
        "vpdpbusd %%zmm22, %%zmm19, %%zmm14\n\t"
        "vpbroadcastd 4(%[xa],%[k3]), %%zmm23\n\t"
        "vpdpbusd %%zmm23, %%zmm17, %%zmm11\n\t"
        "vpdpbusd %%zmm23, %%zmm19, %%zmm15\n\t"
        "vcvtdq2ps %%zmm8, %%zmm8\n\t"
        "vfmadd231ps (%[sx])%{1to16%}, %%zmm8, %%zmm0\n\t"
        "vcvtdq2ps %%zmm9, %%zmm9\n\t"
        "vfmadd231ps (%[sx],%[ks])%{1to16%}, %%zmm9, %%zmm1\n\t"
        "vcvtdq2ps %%zmm10, %%zmm10\n\t"
        "vfmadd231ps (%[sx],%[ks],2)%{1to16%}, %%zmm10, %%zmm2\n\t"
        "vcvtdq2ps %%zmm11, %%zmm11\n\t"
        "vfmadd231ps (%[sx],%[ks3])%{1to16%}, %%zmm11, %%zmm3\n\t"
        "vcvtdq2ps %%zmm12, %%zmm12\n\t"
        "vfmadd231ps (%[sx])%{1to16%}, %%zmm12, %%zmm4\n\t"
        "vcvtdq2ps %%zmm13, %%zmm13\n\t"
        "vfmadd231ps (%[sx],%[ks])%{1to16%}, %%zmm13, %%zmm5\n\t"
        "vcvtdq2ps %%zmm14, %%zmm14\n\t"
        "vfmadd231ps (%[sx],%[ks],2)%{1to16%}, %%zmm14, %%zmm6\n\t"
        "vcvtdq2ps %%zmm15, %%zmm15\n\t"
        "vfmadd231ps (%[sx],%[ks3])%{1to16%}, %%zmm15, %%zmm7\n\t"
        "add $64, %[w0]\n\t"
        "add $64, %[w1]\n\t"
        "add $8, %[xa]\n\t"
        "add $4, %[sx]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vmovups %%zmm0, 0(%[t])\n\t"
        "vmovups %%zmm1, 64(%[t])\n\t"
        "vmovups %%zmm2, 128(%[t])\n\t"
        "vmovups %%zmm3, 192(%[t])\n\t"
        "vmovups %%zmm4, 256(%[t])\n\t"
        "vmovups %%zmm5, 320(%[t])\n\t"
        "vmovups %%zmm6, 384(%[t])\n\t"
        "vmovups %%zmm7, 448(%[t])"
        : [w0] "+r"(w0), [w1] "+r"(w1), [xa] "+r"(xa), [sx] "+r"(sx), [n] "+r"(n)
        : [t] "r"(&t[0][0][0]), [mask] "v"(_mm512_set1_epi8(0x0F)), [k] "r"(ldx), [k3] "r"(k3), [ks] "r"(ks),
          [ks3] "r"(ks3)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
          "xmm23", "cc", "memory");
  }
  static void finish(const Acc& acc, const float* sw, const uint8_t* z, float sx, int32_t xsum, float* y) {
    const __m512i z32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
    const __m512 t = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_mullo_epi32(z32, _mm512_set1_epi32(xsum))));
    const __m512 c = _mm512_mul_ps(_mm512_loadu_ps(sw), _mm512_set1_ps(sx));
    _mm512_storeu_ps(y, _mm512_fmadd_ps(c, t, _mm512_loadu_ps(y)));
  }
  static void accumulate(const Acc& acc, float sx, float* t) {
    _mm512_storeu_ps(t, _mm512_fmadd_ps(_mm512_set1_ps(sx), _mm512_cvtepi32_ps(acc), _mm512_loadu_ps(t)));
  }
  static void finish_group(const float* t, const float* sw, const uint8_t* z, float zsum, float* y) {
    const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
    const __m512 u = _mm512_fnmadd_ps(zf, _mm512_set1_ps(zsum), _mm512_loadu_ps(t));
    _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_loadu_ps(sw), u, _mm512_loadu_ps(y)));
  }
};

#include "backend/cpu/qlinear_impl.h"
#undef ACCEL_UNPACK_TWO_BLOCKS
#undef ACCEL_ZERO_ZMM0_7
#undef ACCEL_ZERO_ZMM8_15
#undef ACCEL_STEPS_2X8
#undef ACCEL_STEPS_2X8_W8
#undef ACCEL_LOOP_2X8
#undef ACCEL_COMBINE_BLOCK
#undef ACCEL_COMBINE_TWO_BLOCKS
#undef ACCEL_GROUP_FINISH
#undef ACCEL_FINISH
#undef ACCEL_ZREG0
#undef ACCEL_ZREG1
#undef ACCEL_SWREG0
#undef ACCEL_SWREG1

}  // namespace

void qlinear_w4a8_avx512vnni(const QLinearParams& p, int64_t n0, int64_t n1) {
  qlinear_rows<Avx512VnniDot>(p, n0, n1);
}

}  // namespace accelcore::cpu
