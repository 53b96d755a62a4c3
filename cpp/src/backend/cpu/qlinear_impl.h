// The W4A8 linear kernel body (see quant/q4.h for the formats and the exact arithmetic), compiled
// once per dot-product instruction set: qlinear_*.cc define a struct with
//   static int32_t dot(const uint8_t* packed, const int8_t* x, int64_t len)
// (the int32 sum over len weights, a multiple of 32, packed in 32-weight chunks) and include this.
// The integer sum is exact whatever the instructions; the float steps below are the same scalar
// operations on every path, so all paths give the same bits, and a row's result does not depend
// on the batch.
//
// Not a standalone header: the including file defines the namespace.

template <class Dot>
void qlinear_rows(const QLinearParams& p, int64_t n0, int64_t n1) {
  const int64_t G = p.groups, gs = p.group, kp = G * gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = p.w + n * kp / 2;
    const float* ws = p.w_scales + n * G;
    const uint8_t* wz = p.w_zeros + n * G;
    for (int64_t m = 0; m < p.m; ++m) {
      const int8_t* xr = p.xq + m * kp;
      const float* xs = p.x_scales + m * G;
      const int32_t* xsum = p.x_sums + m * G;
      float y = p.bias ? p.bias[n] : 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const int32_t dot = Dot::dot(wr + g * gs / 2, xr + g * gs, gs);
        y = std::fma(ws[g] * xs[g], static_cast<float>(dot - static_cast<int32_t>(wz[g]) * xsum[g]), y);
      }
      p.y[m * p.ldy + n] = y;
    }
  }
}
