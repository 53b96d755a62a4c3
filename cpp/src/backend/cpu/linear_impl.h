// The linear kernel body shared by the SIMD paths. Each ISA file (linear_avx2.cc,
// linear_avx512.cc, compiled with its own flags) defines a traits struct V with the vector type
// and its operations, and instantiates linear_panels<V, ...>.
//
// Panel form: the weights come in panels of kLinearPanel output columns, each [k][16]
// (linear_pack), so output (m, n) is one lane of a vector accumulated by fused multiply-adds of
// the broadcast input x[m, i] with row i of its panel, i = 0, 1, ..., k - 1 in order, then the
// bias added. No horizontal sums (a dot-product form spent most of its time in them at the small
// k of small models), and the same sequence for every output whatever the block shape, so results
// do not depend on how many tokens share the call or on the thread split; it is the scalar path's
// sequence too (std::fma), so every path gives the same bits.
//
// Not a standalone header: the including file provides the intrinsics and the namespace.
//
// struct V {
//   using Vec = ...; static constexpr int kWidth = ...;  // 16 / kWidth vectors per panel
//   static Vec zero(); static Vec load(const float*); static Vec set1(float);
//   static void store(float*, Vec); static Vec add(Vec, Vec);
//   static Vec fma(Vec a, Vec b, Vec c);  // a*b+c
// };

// Rows [m0, m0 + MR) by panels [q0, q0 + NP), storing the columns in [n0, n1).
template <class V, int MR, int NP>
inline void linear_block(const LinearParams& p, int64_t m0, int64_t q0, int64_t n0, int64_t n1) {
  constexpr int VP = kLinearPanel / V::kWidth;  // vectors per panel
  typename V::Vec acc[MR][NP * VP];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP * VP; ++j) acc[i][j] = V::zero();
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = p.x + (m0 + i) * p.ldx;
  const float* w = p.w + q0 * p.k * kLinearPanel;
  for (int64_t kk = 0; kk < p.k; ++kk, w += kLinearPanel) {
    typename V::Vec wv[NP * VP];
    for (int j = 0; j < NP; ++j)
      for (int v = 0; v < VP; ++v) wv[j * VP + v] = V::load(w + j * p.k * kLinearPanel + v * V::kWidth);
    for (int i = 0; i < MR; ++i) {
      const typename V::Vec xb = V::set1(xr[i][kk]);
      for (int j = 0; j < NP * VP; ++j) acc[i][j] = V::fma(xb, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* y = p.y + (m0 + i) * p.ldy;
    for (int j = 0; j < NP * VP; ++j) {
      const int64_t c0 = q0 * kLinearPanel + j * V::kWidth;
      if (c0 >= n0 && c0 + V::kWidth <= n1) {
        V::store(y + c0, p.bias ? V::add(acc[i][j], V::load(p.bias + c0)) : acc[i][j]);
        continue;
      }
      alignas(64) float lanes[V::kWidth];  // an edge vector: only its columns in [n0, n1)
      V::store(lanes, acc[i][j]);
      for (int64_t c = std::max(c0, n0); c < std::min(c0 + V::kWidth, n1); ++c)
        y[c] = p.bias ? lanes[c - c0] + p.bias[c] : lanes[c - c0];
    }
  }
}

// The last rows of a call, fewer than a block: one block of exactly that many.
template <class V, int R, int NP>
inline void linear_rest(const LinearParams& p, int64_t m, int64_t q0, int64_t n0, int64_t n1) {
  if constexpr (R > 0) {
    if (p.m - m == R) return linear_block<V, R, NP>(p, m, q0, n0, n1);
    linear_rest<V, R - 1, NP>(p, m, q0, n0, n1);
  }
}

template <class V, int MR, int NP>
inline void linear_rows(const LinearParams& p, int64_t q0, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + MR <= p.m; m += MR) linear_block<V, MR, NP>(p, m, q0, n0, n1);
  linear_rest<V, MR - 1, NP>(p, m, q0, n0, n1);
}

// Panels [q, q_end), NP at a time (the rest NP / 2 at a time, ...), each block run over all rows
// while its weights are in cache.
template <class V, int MR, int NP>
inline void linear_panel_range(const LinearParams& p, int64_t q, int64_t q_end, int64_t n0, int64_t n1) {
  for (; q + NP <= q_end; q += NP) linear_rows<V, MR, NP>(p, q, n0, n1);
  if constexpr (NP > 1) linear_panel_range<V, MR, NP / 2>(p, q, q_end, n0, n1);
}

// Output columns [n0, n1): the panels that hold them.
template <class V, int MR, int NP>
inline void linear_panels(const LinearParams& p, int64_t n0, int64_t n1) {
  linear_panel_range<V, MR, NP>(p, n0 / kLinearPanel, (n1 + kLinearPanel - 1) / kLinearPanel, n0, n1);
}
