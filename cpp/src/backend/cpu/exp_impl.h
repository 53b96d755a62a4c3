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

// exp(x) in double arithmetic for x <= 0 (a softmax's exponents in the sampler), within a few ulp
// of std::exp: range reduction by ln 2 (split in two parts, fdlibm's) and the Taylor series to
// r^13 / 13! (|r| <= ln(2) / 2, so the remainder is under 1e-17 relative). Plain arithmetic, so
// the loops that call it vectorise, as std::exp's calls do not (10 ns each on Zen 4). Below
// kExpF64Min, where the result would be subnormal, it gives 0; NaN stays NaN.
constexpr double kExpF64Min = -708.0;
inline double exp_f64_nonpositive(double x) {
  const double xc = x < kExpF64Min ? kExpF64Min : x;  // 2^n stays normal (NaN passes: the compare fails)
  constexpr double kShifter = 6755399441055744.0;       // 1.5 * 2^52: adding it rounds to an integer
  const double t = xc * 1.4426950408889634 + kShifter;
  const double n = t - kShifter;
  const double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  // Estrin's scheme: a dependency chain of 4 multiply-adds instead of Horner's 13.
  const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const double q0 = 1.0 + r, q1 = 0.5 + r * (1.0 / 6.0), q2 = 1.0 / 24.0 + r * (1.0 / 120.0),
               q3 = 1.0 / 720.0 + r * (1.0 / 5040.0), q4 = 1.0 / 40320.0 + r * (1.0 / 362880.0),
               q5 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0), q6 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
  const double s0 = q0 + r2 * q1, s1 = q2 + r2 * q3, s2 = q4 + r2 * q5;
  const double p = (s0 + r4 * s1) + r8 * (s2 + r4 * q6);
  // 2^n: n sits in t's low mantissa bits, above the shifter's.
  uint64_t tb, sb;
  std::memcpy(&tb, &t, sizeof(tb));
  std::memcpy(&sb, &kShifter, sizeof(sb));
  const uint64_t bits = (tb - sb + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kExpF64Min ? 0.0 : p * scale;
}
