// exp(x) in float arithmetic, shared by the kernels that must give the same bits on every path
// (the softmax, the SiLU). Not a standalone header: included inside each ISA file's namespace,
// compiled with that file's flags (-ffp-contract=off: no fused multiply-adds, so a vectorised lane
// computes exactly what a lone call computes).
//
// Cephes' expf: range reduction by ln 2 and a degree-5 polynomial, about 1 ulp. Plain arithmetic,
// so the compiler vectorises the loops that call it. Inputs are clamped to [-87, 88] to keep the
// exponent normal: below, results under 1.7e-38 (nothing next to a softmax maximum's exp(0) = 1,
// and a SiLU of -87 is -0 to 1e-36); above, exp(88) = 1.6e38 (a SiLU's 1 / (1 + exp(-x)) is then
// 0 to 1e-38).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: plain adds, which vectorise (std::floor may not).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
