// The W4A16 linear kernel body (4-bit weights in the tiled layout, float activations), compiled
// once per float instruction set. Every output is
//   y = bias; for each channel k in order: y = fma(s[g] * float(q[k] - z[g]), x[k], y)
// with g = k / group: the lanes of a vector are 16 output rows, each running exactly that sequence,
// so every path gives the same bits as the scalar one, whatever the batch.
//
// Not a standalone header: the including file defines the namespace and a struct F with
//   Vec, zero(), load(const float*), store(float*, Vec), fma(a, b, c), mul(a, b), set1(float),
//   weights(const uint8_t* w64, int c, bool high, Vec zero_f, Vec scale) -> the 16 rows' weight
//     (s * float(q - z)) of channel c (or 4 + c when high) of an 8-channel step.

template <class F, int MB>
void qlinear16_block(const QLinear16Params& p, int64_t b, int64_t m0) {
  constexpr int64_t R = Q4Tiled::kRows;
  const int64_t G = p.groups, gs = p.group, steps = gs / 8;
  const int64_t rows = std::min<int64_t>(R, p.n - b * R);
  typename F::Vec y[MB];
  alignas(64) float init[R];
  for (int64_t r = 0; r < R; ++r) init[r] = p.bias && r < rows ? p.bias[b * R + r] : 0.0f;
  for (int i = 0; i < MB; ++i) y[i] = F::load(init);
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) float zf[R];
    const uint8_t* z = p.w_zeros + (b * G + g) * R;
    for (int64_t r = 0; r < R; ++r) zf[r] = static_cast<float>(z[r]);
    const typename F::Vec zv = F::load(zf), sv = F::load(p.w_scales + (b * G + g) * R);
    const uint8_t* wg = p.w + (b * G + g) * steps * 64;
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t k0 = g * gs + 8 * j;
      for (int c = 0; c < 8; ++c) {
        if (k0 + c >= p.k) break;  // the padding past k: no product, as in the scalar order
        const typename F::Vec w = F::weights(wg + j * 64, c % 4, c >= 4, zv, sv);
        for (int i = 0; i < MB; ++i) y[i] = F::fma(w, F::set1(p.x[(m0 + i) * p.ldx + k0 + c]), y[i]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    alignas(64) float out[R];
    F::store(out, y[i]);
    for (int64_t r = 0; r < rows; ++r) p.y[(m0 + i) * p.ldy + b * R + r] = out[r];
  }
}

template <class F>
void qlinear16_rows(const QLinear16Params& p, int64_t n0, int64_t n1) {
  constexpr int64_t R = Q4Tiled::kRows;
  for (int64_t b = n0 / R; b * R < n1; ++b) {
    int64_t m = 0;
    for (; m + 4 <= p.m; m += 4) qlinear16_block<F, 4>(p, b, m);
    switch (p.m - m) {
      case 3: qlinear16_block<F, 3>(p, b, m); break;
      case 2: qlinear16_block<F, 2>(p, b, m); break;
      case 1: qlinear16_block<F, 1>(p, b, m); break;
      default: break;
    }
  }
}
