#include "quant/q4.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/check.h"

namespace accelcore {

namespace {

// Round half to even for |v| < 2^22, by the 1.5 * 2^23 trick: two adds instead of a libm call
// (std::nearbyint is one without SSE4.1), and the same result.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

void check_group(int64_t group) {
  ACCEL_CHECK(group >= 32 && group % 32 == 0, InvalidArgument)
      << "quantization group size must be a positive multiple of 32, got " << group;
}

// Scale and zero point mapping [lo, hi] (which holds 0) onto [0, 15].
void range_to_scale(float lo, float hi, float* scale, uint8_t* zero) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  const float s = (hi - lo) / 15.0f;
  if (s <= 0.0f || !std::isfinite(s)) {
    *scale = 1.0f;
    *zero = 0;
    return;
  }
  *scale = s;
  *zero = static_cast<uint8_t>(std::clamp(round_even(-lo / s), 0.0f, 15.0f));
}

uint8_t quantize_one(float x, float scale, uint8_t zero) {
  // |x / scale| is at most about 20 (a clipped value over a shrunk range): the trick applies.
  return static_cast<uint8_t>(std::clamp(round_even(x / scale) + zero, 0.0f, 15.0f));
}

// A group's scale and zero point from its range x[0, len), or with clip_search from the range
// shrunk by 0 to 25% in steps of 5% that gives the least squared error.
void group_params(const float* x, int64_t len, bool clip_search, float* scale_out, uint8_t* zero_out) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < len; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  float best_err = INFINITY;
  for (int step = 0; step <= (clip_search ? 5 : 0); ++step) {
    const float ratio = 1.0f - 0.05f * step;
    float scale;
    uint8_t zero;
    range_to_scale(lo * ratio, hi * ratio, &scale, &zero);
    float err = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float d = scale * (static_cast<float>(quantize_one(x[i], scale, zero)) - zero) - x[i];
      err += d * d;
    }
    if (err < best_err) best_err = err, *scale_out = scale, *zero_out = zero;
  }
}

}  // namespace

uint8_t q4_at(const Q4Weight& w, int64_t row, int64_t i) {
  const int64_t g = i / w.group, j = i % w.group, chunk = j / 32, lane = j % 32;
  const uint8_t byte = w.packed[((row * w.groups() + g) * w.group + chunk * 32) / 2 + lane % 16];
  return lane < 16 ? byte & 0x0F : byte >> 4;
}

void q4_pack(const uint8_t* q, Q4Weight* w) {
  const int64_t kp = w->padded_k();
  w->packed.assign(static_cast<size_t>(w->n * kp / 2), 0);
  for (int64_t r = 0; r < w->n; ++r)
    for (int64_t c = 0; c < kp; c += 32) {
      uint8_t* out = w->packed.data() + (r * kp + c) / 2;
      const uint8_t* in = q + r * kp + c;
      for (int j = 0; j < 16; ++j) {
        ACCEL_DCHECK(in[j] < 16 && in[j + 16] < 16);
        out[j] = static_cast<uint8_t>(in[j] | (in[j + 16] << 4));
      }
    }
}

Q4Weight q4_quantize_rtn(const float* w, int64_t n, int64_t k, int64_t group, bool clip_search) {
  check_group(group);
  ACCEL_CHECK(n > 0 && k > 0, InvalidArgument) << "cannot quantize a " << n << " x " << k << " matrix";
  Q4Weight out;
  out.n = n;
  out.k = k;
  out.group = group;
  const int64_t G = out.groups(), kp = out.padded_k();
  out.scales.resize(n * G);
  out.zeros.resize(n * G);
  std::vector<uint8_t> q(static_cast<size_t>(n * kp), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* x = w + r * k + g * group;
      const int64_t len = std::min(group, k - g * group);
      group_params(x, len, clip_search, &out.scales[r * G + g], &out.zeros[r * G + g]);
      for (int64_t i = 0; i < len; ++i) q[r * kp + g * group + i] = quantize_one(x[i], out.scales[r * G + g], out.zeros[r * G + g]);
    }
  q4_pack(q.data(), &out);
  return out;
}

namespace {

// In place: a = L with L L^T = a (lower triangle; the upper is left as it was). False if a is not
// positive definite.
bool cholesky_lower(std::vector<double>* a, int64_t k) {
  double* m = a->data();
  for (int64_t j = 0; j < k; ++j) {
    double d = m[j * k + j];
    for (int64_t p = 0; p < j; ++p) d -= m[j * k + p] * m[j * k + p];
    if (!(d > 0)) return false;
    d = std::sqrt(d);
    m[j * k + j] = d;
    for (int64_t i = j + 1; i < k; ++i) {
      double v = m[i * k + j];
      for (int64_t p = 0; p < j; ++p) v -= m[i * k + p] * m[j * k + p];
      m[i * k + j] = v / d;
    }
  }
  return true;
}

}  // namespace

Q4Weight q4_quantize_gptq(const float* w, int64_t n, int64_t k, int64_t group, const double* h, double damp) {
  check_group(group);
  ACCEL_CHECK(n > 0 && k > 0, InvalidArgument) << "cannot quantize a " << n << " x " << k << " matrix";
  ACCEL_CHECK(damp > 0, InvalidArgument) << "GPTQ damping must be positive, got " << damp;
  // A channel no input ever used (H[i][i] = 0): its weights cannot matter, so they are zeroed
  // before they can widen a group's range.
  std::vector<float> w0(w, w + n * k);
  for (int64_t i = 0; i < k; ++i)
    if (h[i * k + i] <= 0)
      for (int64_t r = 0; r < n; ++r) w0[r * k + i] = 0.0f;
  // Columns are quantized by decreasing H[i][i] (the GPTQ paper's act-order: the columns whose
  // error costs most go first, while most others can still absorb it), so the groups' parameters
  // are fixed up front, from the weights, with the clip search.
  std::vector<int64_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return h[a * k + a] > h[b * k + b]; });
  std::vector<double> H(k * k), W(n * k);  // in processing order
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) H[i * k + j] = h[order[i] * k + order[j]];
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) W[r * k + i] = w0[r * k + order[i]];
  double mean_diag = 0;
  for (int64_t i = 0; i < k; ++i) mean_diag += H[i * k + i];
  mean_diag /= static_cast<double>(k);
  for (int64_t i = 0; i < k; ++i) {
    if (H[i * k + i] <= 0) H[i * k + i] = 1;
    H[i * k + i] += damp * (mean_diag > 0 ? mean_diag : 1.0);
  }
  // U upper with U^T U = H^-1: invert H through its Cholesky factor, then factor the inverse.
  ACCEL_CHECK(cholesky_lower(&H, k), InvalidArgument) << "GPTQ: the Hessian is not positive definite";
  std::vector<double> Linv(k * k, 0.0);  // L^-1, lower
  for (int64_t j = 0; j < k; ++j) {
    Linv[j * k + j] = 1.0 / H[j * k + j];
    for (int64_t i = j + 1; i < k; ++i) {
      double v = 0;
      for (int64_t p = j; p < i; ++p) v -= H[i * k + p] * Linv[p * k + j];
      Linv[i * k + j] = v / H[i * k + i];
    }
  }
  std::vector<double> Hinv(k * k, 0.0);  // L^-T L^-1
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double v = 0;
      for (int64_t p = i; p < k; ++p) v += Linv[p * k + i] * Linv[p * k + j];
      Hinv[i * k + j] = Hinv[j * k + i] = v;
    }
  ACCEL_CHECK(cholesky_lower(&Hinv, k), InvalidArgument) << "GPTQ: the inverse Hessian is not positive definite";
  // U = L'^T where L' L'^T = H^-1.
  auto U = [&](int64_t i, int64_t j) { return Hinv[j * k + i]; };

  Q4Weight out;
  out.n = n;
  out.k = k;
  out.group = group;
  const int64_t G = out.groups(), kp = out.padded_k();
  out.scales.resize(n * G);
  out.zeros.resize(n * G);
  std::vector<uint8_t> q(static_cast<size_t>(n * kp), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < G; ++g)
      group_params(w0.data() + r * k + g * group, std::min(group, k - g * group), /*clip_search=*/true, &out.scales[r * G + g], &out.zeros[r * G + g]);
  for (int64_t ii = 0; ii < k; ++ii) {
    const int64_t i = order[ii], g = i / group;
    const double d = U(ii, ii);
    for (int64_t r = 0; r < n; ++r) {
      const float s = out.scales[r * G + g];
      const uint8_t z = out.zeros[r * G + g];
      const uint8_t qv = quantize_one(static_cast<float>(W[r * k + ii]), s, z);
      q[r * kp + i] = qv;
      const double err = (W[r * k + ii] - static_cast<double>(s) * (static_cast<double>(qv) - z)) / d;
      for (int64_t j = ii + 1; j < k; ++j) W[r * k + j] -= err * U(ii, j);
    }
  }
  q4_pack(q.data(), &out);
  return out;
}

std::vector<float> q4_dequantize(const Q4Weight& w) {
  std::vector<float> out(static_cast<size_t>(w.n * w.k));
  const int64_t G = w.groups();
  for (int64_t r = 0; r < w.n; ++r)
    for (int64_t i = 0; i < w.k; ++i) {
      const int64_t g = i / w.group;
      out[r * w.k + i] = w.scales[r * G + g] * (static_cast<float>(q4_at(w, r, i)) - w.zeros[r * G + g]);
    }
  return out;
}

Q4Tiled q4_tile(const Q4Weight& w) {
  Q4Tiled t;
  t.n = w.n;
  t.k = w.k;
  t.group = w.group;
  t.groups = w.groups();
  const int64_t B = t.blocks(), G = t.groups, R = Q4Tiled::kRows, steps = w.group / 8;
  t.data.assign(static_cast<size_t>(B * G * steps * 64), 0);
  t.scales.assign(static_cast<size_t>(B * G * R), 0.0f);
  t.zeros.assign(static_cast<size_t>(B * G * R), 0);
  const int64_t kp = w.padded_k();
  std::vector<uint8_t> q(kp);  // one row unpacked (q4_pack's chunks of 32 in 16 bytes)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R && b * R + r < w.n; ++r) {
      const int64_t row = b * R + r;
      const uint8_t* packed = w.packed.data() + row * kp / 2;
      for (int64_t c = 0; c < kp; c += 32)
        for (int j = 0; j < 16; ++j) {
          q[c + j] = packed[c / 2 + j] & 0x0F;
          q[c + 16 + j] = packed[c / 2 + j] >> 4;
        }
      for (int64_t g = 0; g < G; ++g) {
        t.scales[(b * G + g) * R + r] = w.scales[row * G + g];
        t.zeros[(b * G + g) * R + r] = w.zeros[row * G + g];
        for (int64_t j = 0; j < steps; ++j) {
          uint8_t* out = t.data.data() + ((b * G + g) * steps + j) * 64 + 4 * r;
          for (int c = 0; c < 4; ++c) {
            const int64_t i = g * w.group + 8 * j + c;
            out[c] = static_cast<uint8_t>(q[i] | (q[i + 4] << 4));
          }
        }
      }
    }
  return t;
}

uint8_t q4_tiled_at(const Q4Tiled& t, int64_t row, int64_t i) {
  const int64_t b = row / Q4Tiled::kRows, r = row % Q4Tiled::kRows, g = i / t.group, j = (i % t.group) / 8,
                c = i % 8;
  const uint8_t byte = t.data[((b * t.groups + g) * (t.group / 8) + j) * 64 + 4 * r + c % 4];
  return c < 4 ? byte & 0x0F : byte >> 4;
}

Q4Weight q4_untile(const Q4Tiled& t, int64_t row0, int64_t n) {
  ACCEL_DCHECK(row0 >= 0 && row0 + n <= t.n);
  Q4Weight w;
  w.n = n;
  w.k = t.k;
  w.group = t.group;
  const int64_t G = t.groups, R = Q4Tiled::kRows, kp = w.padded_k();
  std::vector<uint8_t> q(static_cast<size_t>(n * kp));
  w.scales.resize(n * G);
  w.zeros.resize(n * G);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = row0 + r, b = row / R, lane = row % R;
    for (int64_t i = 0; i < kp; ++i) q[r * kp + i] = q4_tiled_at(t, row, i);
    for (int64_t g = 0; g < G; ++g) {
      w.scales[r * G + g] = t.scales[(b * G + g) * R + lane];
      w.zeros[r * G + g] = t.zeros[(b * G + g) * R + lane];
    }
  }
  q4_pack(q.data(), &w);
  return w;
}

Q8Rows q8_quantize_rows(const float* w, int64_t n, int64_t k) {
  Q8Rows r;
  r.n = n;
  r.k = k;
  r.q.resize(n * k);
  r.scales.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = w + i * k;
    float amax = 0;
    for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float scale = amax > 0 ? amax / 127.0f : 1.0f, inv = 1.0f / scale;
    r.scales[i] = scale;
    for (int64_t j = 0; j < k; ++j) r.q[i * k + j] = static_cast<int8_t>(std::clamp(round_even(row[j] * inv), -127.0f, 127.0f));
  }
  return r;
}

void q8_dequantize(const Q8Rows& r, float* w) {
  for (int64_t i = 0; i < r.n; ++i)
    for (int64_t j = 0; j < r.k; ++j) w[i * r.k + j] = r.scales[i] * static_cast<float>(r.q[i * r.k + j]);
}

Q4Weight q8_split_q4(const Q8Rows& r, int64_t group) {
  check_group(group);
  const int64_t lo = q8_split_lo(r.n);
  Q4Weight w;
  w.n = 2 * lo;
  w.k = r.k;
  w.group = group;
  const int64_t G = w.groups(), kp = w.padded_k();
  std::vector<uint8_t> q(static_cast<size_t>(w.n * kp), 0);
  w.scales.assign(w.n * G, 0.0f);
  w.zeros.assign(w.n * G, 0);
  for (int64_t i = 0; i < r.n; ++i) {
    for (int64_t j = 0; j < r.k; ++j) {
      const int u = r.q[i * r.k + j] + 128;
      q[i * kp + j] = static_cast<uint8_t>(u >> 4);
      q[(lo + i) * kp + j] = static_cast<uint8_t>(u & 15);
    }
    for (int64_t g = 0; g < G; ++g) {
      w.scales[i * G + g] = 16.0f * r.scales[i];
      w.zeros[i * G + g] = 8;
      w.scales[(lo + i) * G + g] = r.scales[i];
    }
  }
  // Padding past k: h = 8 and l = 0 encode q = 0 (the activations' padding is 0 anyway).
  for (int64_t i = 0; i < r.n; ++i)
    for (int64_t j = r.k; j < kp; ++j) q[i * kp + j] = 8;
  q4_pack(q.data(), &w);
  return w;
}

void a8_resize(A8Activations* a, int64_t m, int64_t k, int64_t group, int64_t act_group) {
  check_group(group);
  ACCEL_DCHECK(act_group % 8 == 0 && group % act_group == 0);
  a->m = m;
  a->k = k;
  a->group = group;
  a->act_group = act_group;
  a->q.resize(static_cast<size_t>(m * a->padded_k()));
  a->scales.resize(m * a->act_groups());
  a->sums.resize(m * a->act_groups());
  a->zsums.resize(act_group < group ? m * a->groups() : 0);
}

void a8_quantize_rows(const float* x, int64_t r0, int64_t r1, int64_t ldx, A8Activations* a) {
  ACCEL_DCHECK(a->act_group == a->group);
  const int64_t G = a->groups(), kp = a->padded_k(), k = a->k, group = a->group;
  // Whole groups in vectors where the machine has AVX-512 or AVX2 (the same bits; at batch 16 on
  // TinyLlama's shape the scalar loop was 5.7% of a decode step on AVX-512, 2.7% on AVX2).
  const cpu::Isa isa = cpu::active_isa();
  const int64_t vector_groups = isa == cpu::Isa::kScalar ? 0 : k / group;
  for (int64_t r = r0; r < r1; ++r) {
    if (vector_groups > 0)
      (isa == cpu::Isa::kAvx512 ? cpu::a8_quantize_groups_avx512 : cpu::a8_quantize_groups_avx2)(
          x + r * ldx, vector_groups, group, a->q.data() + r * kp, a->scales.data() + r * G, a->sums.data() + r * G);
    for (int64_t g = vector_groups; g < G; ++g) {
      const float* xs = x + r * ldx + g * group;
      const int64_t len = std::min(group, k - g * group);
      float amax = 0;
      for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(xs[i]));
      const float scale = amax > 0 ? amax / 127.0f : 1.0f;
      const float inv = 1.0f / scale;
      int8_t* q = a->q.data() + r * kp + g * group;
      int32_t sum = 0;
      for (int64_t i = 0; i < len; ++i) {
        q[i] = static_cast<int8_t>(std::clamp(round_even(xs[i] * inv), -127.0f, 127.0f));
        sum += q[i];
      }
      for (int64_t i = len; i < group; ++i) q[i] = 0;  // padding past k
      a->scales[r * G + g] = scale;
      a->sums[r * G + g] = sum;
    }
  }
}

void a8_quantize(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, A8Activations* a) {
  a8_resize(a, m, k, group, group);
  a8_quantize_rows(x, 0, m, ldx, a);
}

void a4_quantize_rows(const float* x, int64_t r0, int64_t r1, int64_t ldx, const int32_t* perm, int64_t a8_subgroups,
                      A8Activations* a) {
  ACCEL_DCHECK(a->act_group == kA4SubGroup);
  const int64_t k = a->k, kp = a->padded_k(), S = a->act_groups();
  const int64_t first8 = (k + kA4SubGroup - 1) / kA4SubGroup - a8_subgroups;  // sub-groups from here: 8 bits
  float row[kA4SubGroup];
  // The vector paths give the same bits: AVX-512 two sub-groups a vector, AVX2 one.
  const cpu::Isa isa = cpu::active_isa();
  const bool vectors = isa != cpu::Isa::kScalar;
  ACCEL_DCHECK(S % 2 == 0);  // kp is a multiple of the group (at least 32 channels)
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    if (vectors)
      (isa == cpu::Isa::kAvx512 ? cpu::a4_quantize_subgroups_avx512 : cpu::a4_quantize_subgroups_avx2)(
          xr, k, perm, S, first8, a->q.data() + r * kp, a->scales.data() + r * S, a->sums.data() + r * S);
    for (int64_t j = 0; j < (vectors ? 0 : S); ++j) {
      // The sub-group's channels, through the permutation; zero past k.
      for (int64_t i = 0; i < kA4SubGroup; ++i) {
        const int64_t c = j * kA4SubGroup + i;
        row[i] = c < k ? xr[perm ? perm[c] : c] : 0.0f;
      }
      // 8 bits: [-127, 127]. 4 bits: all 16 levels, [-8, 7], the wider side towards the larger
      // magnitude (a scale from the positive maximum / 7 or the negative one / 8, whichever is larger).
      const bool eight = j >= first8;
      float hi = 0, lo = 0;
      for (int64_t i = 0; i < kA4SubGroup; ++i) hi = std::max(hi, row[i]), lo = std::min(lo, row[i]);
      const float qhi = eight ? 127.0f : 7.0f, qlo = eight ? -127.0f : -8.0f;
      const float scale = hi > 0 || lo < 0 ? std::max(hi / qhi, lo / qlo) : 1.0f;
      const float inv = 1.0f / scale;
      int8_t* q = a->q.data() + r * kp + j * kA4SubGroup;
      int32_t sum = 0;
      for (int64_t i = 0; i < kA4SubGroup; ++i) {
        q[i] = static_cast<int8_t>(std::clamp(round_even(row[i] * inv), qlo, qhi));
        sum += q[i];
      }
      a->scales[r * S + j] = scale;
      a->sums[r * S + j] = sum;
    }
    const int64_t subs = a->group / kA4SubGroup;
    for (int64_t g = 0; g < a->groups(); ++g) {
      float c = 0.0f;
      for (int64_t j = g * subs; j < (g + 1) * subs; ++j) c = std::fma(a->scales[r * S + j], static_cast<float>(a->sums[r * S + j]), c);
      a->zsums[r * a->groups() + g] = c;
    }
  }
}

void a4_quantize(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t group, const int32_t* perm,
                 int64_t a8_subgroups, A8Activations* a) {
  a8_resize(a, m, k, group, kA4SubGroup);
  a4_quantize_rows(x, 0, m, ldx, perm, a8_subgroups, a);
}

}  // namespace accelcore
