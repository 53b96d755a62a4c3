// The 256-bit W4A8 dot-product policy (a 16-row block as two 8-lane halves) shared by the AVX2
// and AVX-VNNI kernels, which differ only in how 4 u8 x s8 products are summed into an int32
// lane: the including file defines, before including this,
//   inline __m256i add_products(__m256i acc, __m256i w_lo, __m256i x_lo, __m256i w_hi, __m256i x_hi)
// (acc + the 4-byte dot products of w_lo with x_lo and of w_hi with x_hi, lane by lane).
//
// Not a standalone header: the including file defines the namespace and includes
// qlinear_impl.h (its prefetch distance PF) before this.

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

struct Dot256 {
  static constexpr int kBlocks = 1;  // 16-row blocks per pass (two would spill the 16 registers)
  static constexpr int kWideBlocks = 1, kWideRows = 4;  // no wider pass
  static constexpr int kAsmBlocks = 0, kAsmRows = 0;
  static constexpr int kSubAsmBlocks = 1, kSubAsmRows = 2;  // asm_sub_steps below, for 1 or 2 rows
  static constexpr bool kSubAsmFewerRows = true;
  // AVX2's products of 8-bit weights would overflow vpmaddubsw's 16-bit sums: W8A8 sums its two
  // 4-bit halves.
  static constexpr bool kW8Combined = false;
  struct Acc {
    __m256i h[2];
  };
  static Acc combine(const Acc& h, const Acc& l) {
    Acc a;
    for (int i = 0; i < 2; ++i) a.h[i] = _mm256_add_epi32(_mm256_slli_epi32(h.h[i], 4), l.h[i]);
    return a;
  }
  struct W {
    __m256i lo[2], hi[2];
  };
  static Acc zero() { return {{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }
  static W unpack(const uint8_t* w64) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    W w;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w64 + 32 * h));
      w.lo[h] = _mm256_and_si256(v, mask);
      w.hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    return w;
  }
  static void dot(Acc& acc, const W& w, const int8_t* x) {
    const __m256i xa = broadcast4(x), xb = broadcast4(x + 4);
    for (int h = 0; h < 2; ++h) acc.h[h] = add_products(acc.h[h], w.lo[h], xa, w.hi[h], xb);
  }
  static void finish(const Acc& acc, const float* sw, const uint8_t* z, float sx, int32_t xsum, float* y) {
    const __m256 vsx = _mm256_set1_ps(sx);
    const __m256i vxsum = _mm256_set1_epi32(xsum);
    for (int h = 0; h < 2; ++h) {
      const __m256i z32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * h)));
      const __m256 t = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc.h[h], _mm256_mullo_epi32(z32, vxsum)));
      const __m256 c = _mm256_mul_ps(_mm256_loadu_ps(sw + 8 * h), vsx);
      _mm256_storeu_ps(y + 8 * h, _mm256_fmadd_ps(c, t, _mm256_loadu_ps(y + 8 * h)));
    }
  }
  static void accumulate(const Acc& acc, float sx, float* t) {
    const __m256 vsx = _mm256_set1_ps(sx);
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(t + 8 * h, _mm256_fmadd_ps(vsx, _mm256_cvtepi32_ps(acc.h[h]), _mm256_loadu_ps(t + 8 * h)));
  }
  // FMPQ's 8-channel sub-groups (one step each) for MB = 1 or 2 rows of one block: each step's
  // int32 sums added into the float sums t by t = fma(sx, float(acc), t), as accumulate() does,
  // with t in registers throughout (the generic loop kept it in memory and ran at half W4A8's
  // speed). Sets t to the group's sums over its `steps` steps (row i's scales at sx + i * lds).
  template <int MB>
  static void asm_sub_steps(float (&t)[1][MB][16], const uint8_t* const (&wg)[1], const int8_t* x, int64_t ldx,
                            const float* sx, int64_t lds, int64_t steps) {
    static_assert(MB == 1 || MB == 2);
    __m256 acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < steps; ++j) {
      __builtin_prefetch(wg[0] + (j + PF) * 64);
      const W w = unpack(wg[0] + j * 64);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xi = x + i * ldx + 8 * j;
        const __m256i xa = broadcast4(xi), xb = broadcast4(xi + 4);
        const __m256 s = _mm256_broadcast_ss(sx + i * lds + j);
        for (int h = 0; h < 2; ++h) {
          const __m256i sum = add_products(_mm256_setzero_si256(), w.lo[h], xa, w.hi[h], xb);
          acc[i][h] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sum), acc[i][h]);
        }
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(t[0][i] + 8 * h, acc[i][h]);
  }
  static void finish_group(const float* t, const float* sw, const uint8_t* z, float zsum, float* y) {
    const __m256 vz = _mm256_set1_ps(zsum);
    for (int h = 0; h < 2; ++h) {
      const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + 8 * h))));
      const __m256 u = _mm256_fnmadd_ps(zf, vz, _mm256_loadu_ps(t + 8 * h));
      _mm256_storeu_ps(y + 8 * h, _mm256_fmadd_ps(_mm256_loadu_ps(sw + 8 * h), u, _mm256_loadu_ps(y + 8 * h)));
    }
  }
};
