// The linear kernel body shared by the SIMD paths. Each ISA file (linear_avx2.cc,
// linear_avx512.cc, compiled with its own flags) defines a traits struct V with the vector type
// and its operations, and instantiates linear_blocks<V>.
//
// Dot-product form: each output (m, n) has one vector accumulator over k in chunks of V::kWidth
// (the tail masked), then a fixed horizontal reduction; the same sequence for every block shape, so
// results do not depend on how many tokens share the call or on the thread split.
//
// Not a standalone header: the including file provides the intrinsics and the namespace.
//
// struct V {
//   using Vec = ...; using Mask = ...; static constexpr int kWidth = ...;
//   static Vec zero(); static Vec load(const float*); static Mask tail_mask(int n);
//   static Vec load_masked(const float*, Mask); static Vec fma(Vec a, Vec b, Vec c);  // a*b+c
//   static float hsum(Vec);
// };

template <class V, int MR, int NR>
inline void linear_block(const LinearParams& p, int64_t m0, int64_t n0) {
  typename V::Vec acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
  const float* xr[MR];
  const float* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = p.x + (m0 + i) * p.ldx;
  for (int j = 0; j < NR; ++j) wr[j] = p.w + (n0 + j) * p.k;
  int64_t kk = 0;
  for (; kk + V::kWidth <= p.k; kk += V::kWidth) {
    typename V::Vec xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = V::load(xr[i] + kk);
    for (int j = 0; j < NR; ++j) {
      const typename V::Vec wv = V::load(wr[j] + kk);
      for (int i = 0; i < MR; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
    }
  }
  if (kk < p.k) {
    const typename V::Mask mask = V::tail_mask(static_cast<int>(p.k - kk));
    typename V::Vec xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = V::load_masked(xr[i] + kk, mask);
    for (int j = 0; j < NR; ++j) {
      const typename V::Vec wv = V::load_masked(wr[j] + kk, mask);
      for (int i = 0; i < MR; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float b = p.bias ? p.bias[n0 + j] : 0.0f;
      p.y[(m0 + i) * p.ldy + n0 + j] = V::hsum(acc[i][j]) + b;
    }
}

template <class V, int NR>
inline void linear_rows(const LinearParams& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.m; m += 4) linear_block<V, 4, NR>(p, m, n0);
  switch (p.m - m) {
    case 3: linear_block<V, 3, NR>(p, m, n0); break;
    case 2: linear_block<V, 2, NR>(p, m, n0); break;
    case 1: linear_block<V, 1, NR>(p, m, n0); break;
    default: break;
  }
}

// Output columns [n0, n1) in blocks of NR weight rows (4 tokens x NR rows of accumulators).
template <class V, int NR>
inline void linear_blocks(const LinearParams& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) linear_rows<V, NR>(p, n);
  for (; n < n1; ++n) linear_rows<V, 1>(p, n);
}
