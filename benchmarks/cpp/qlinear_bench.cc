// The W4A8 linear kernel alone: microseconds and GMAC/s for the four linears of one
// TinyLlama-1.1B layer (qkv 2560x2048, o 2048x2048, gate_up 11264x2048, down 2048x5632) at
// M = 1, 4, 16, 64 activation rows, on every dot-product path the machine has, against the float32
// linear kernel in the same run. Weights are random, group 128; each timing is the best of 5
// after a warm-up call, so the weights sit in the caches as much as they fit.
//
//   cmake -S . -B build-bench -DACCELCORE_BUILD_BENCHMARKS=ON -DCMAKE_BUILD_TYPE=Release
//   cmake --build build-bench --target qlinear_bench && build-bench/benchmarks/cpp/qlinear_bench [threads]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "quant/q4.h"
#include "util/thread_pool.h"

using namespace accelcore;

namespace {

template <class F>
double best_of(F&& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// One W4A8 (or FMPQ) product: the quantized activations a (m rows) by the tiled weights w into y.
void qlinear(const A8Activations& a, const Q4Tiled& w, int64_t m, float* y, ThreadPool& pool) {
  cpu::QLinearParams p;
  p.xq = a.q.data();
  p.x_scales = a.scales.data();
  p.x_sums = a.sums.data();
  p.x_zsums = a.zsums.empty() ? nullptr : a.zsums.data();
  p.act_group = a.act_group;
  p.w = w.data.data();
  p.w_scales = w.scales.data();
  p.w_zeros = w.zeros.data();
  p.y = y;
  p.m = m;
  p.n = w.n;
  p.groups = w.groups;
  p.group = w.group;
  p.ldy = w.n;
  cpu::qlinear_w4a8(p, pool);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : default_num_threads();
  ThreadPool pool(threads);
  struct Shape {
    int n, k;
  } shapes[] = {{2560, 2048}, {2048, 2048}, {11264, 2048}, {2048, 5632}};
  const int group = 128;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<Q4Tiled> q;
  std::vector<std::vector<float>> f;
  for (const Shape& s : shapes) {
    std::vector<float> w(static_cast<size_t>(s.n) * s.k);
    for (float& v : w) v = 0.05f * normal(rng);
    q.push_back(q4_tile(q4_quantize_rtn(w.data(), s.n, s.k, group, false)));
    std::vector<float> panels(static_cast<size_t>(cpu::linear_packed_size(s.n, s.k)));
    cpu::linear_pack(w.data(), s.n, s.k, panels.data());
    f.push_back(std::move(panels));
  }
  std::printf("threads %d; one TinyLlama layer's four linears, group %d\n", threads, group);
  std::printf("| M | path | us | GMAC/s | vs float32 |\n|---|---|---|---|---|\n");
  for (int m : {1, 4, 16, 64}) {
    double macs = 0;
    for (const Shape& s : shapes) macs += double(m) * s.n * s.k;
    std::vector<std::vector<float>> x;
    for (const Shape& s : shapes) {
      std::vector<float> v(static_cast<size_t>(m) * s.k);
      for (float& e : v) e = normal(rng);
      x.push_back(std::move(v));
    }
    std::vector<float> y(static_cast<size_t>(m) * 11264);
    const double t_float = best_of([&] {
      for (size_t i = 0; i < q.size(); ++i) {
        const Shape& s = shapes[i];
        cpu::linear({x[i].data(), f[i].data(), nullptr, y.data(), m, s.n, s.k, s.k, s.n}, pool);
      }
    });
    std::printf("| %d | float32 | %.0f | %.1f | 1.00x |\n", m, 1e6 * t_float, macs / t_float / 1e9);
    const cpu::DotIsa saved = cpu::active_dot_isa();
    for (cpu::DotIsa isa : {cpu::DotIsa::kScalar, cpu::DotIsa::kAvx2, cpu::DotIsa::kAvxVnni, cpu::DotIsa::kAvx512Vnni}) {
      if (!cpu::dot_isa_supported(isa) || (isa == cpu::DotIsa::kScalar && m > 4)) continue;
      cpu::set_active_dot_isa(isa);
      A8Activations a;
      // One layer's four linears, each input quantized by `quantize` into a.
      auto layer = [&](auto&& quantize) {
        for (size_t i = 0; i < q.size(); ++i) {
          const Shape& s = shapes[i];
          quantize(x[i].data(), s.k);
          qlinear(a, q[i], m, y.data(), pool);
        }
      };
      const double t = best_of([&] { layer([&](const float* xi, int64_t k) { a8_quantize(xi, m, k, k, group, &a); }); });
      std::printf("| %d | w4a8 %s | %.0f | %.1f | %.2fx |\n", m, cpu::dot_isa_name(isa), 1e6 * t, macs / t / 1e9, t_float / t);
      if (isa == cpu::DotIsa::kScalar) continue;
      // FMPQ (w4a4): 8-channel activation sub-groups, a quarter of them 8-bit.
      const auto a4 = [&](const float* xi, int64_t k) { a4_quantize(xi, m, k, k, group, nullptr, k / kA4SubGroup / 4, &a); };
      const double t4 = best_of([&] { layer(a4); });
      std::printf("| %d | w4a4 %s | %.0f | %.1f | %.2fx |\n", m, cpu::dot_isa_name(isa), 1e6 * t4, macs / t4 / 1e9, t_float / t4);
      if (isa != saved) continue;  // once, on the machine's own dot products
      // The FMPQ activation quantization alone (the layer's four inputs), vector and scalar code.
      const auto quantize_inputs = [&] {
        for (size_t i = 0; i < q.size(); ++i) a4(x[i].data(), shapes[i].k);
      };
      const double tq = best_of(quantize_inputs);
      const cpu::Isa saved_isa = cpu::active_isa();
      cpu::set_active_isa(cpu::Isa::kScalar);
      const double tq_scalar = best_of(quantize_inputs);
      cpu::set_active_isa(saved_isa);
      std::printf("| %d | w4a4 activation quantization alone, %s (scalar) | %.0f (%.0f) | | |\n", m,
                  cpu::isa_name(saved_isa), 1e6 * tq, 1e6 * tq_scalar);
    }
    cpu::set_active_dot_isa(saved);
  }
  // Decode streams every layer's weights from memory (the model is far larger than the caches),
  // so time 22 layers' worth of copies too: one pass over all of them, per layer, best of 5.
  constexpr int kLayers = 22;
  std::vector<Q4Tiled> layers;
  for (int l = 0; l < kLayers; ++l) layers.insert(layers.end(), q.begin(), q.end());
  std::printf("\n22 layers' weights (%.0f MB), streamed from memory: us per layer\n",
              22.0 * 0.5 * (2560 * 2048 + 2048 * 2048 + 11264 * 2048 + 2048 * 5632) / 1e6);
  std::printf("| M | w4a8 %s | GMAC/s |\n|---|---|---|\n", cpu::dot_isa_name(cpu::active_dot_isa()));
  for (int m : {1, 16}) {
    std::vector<float> x(static_cast<size_t>(m) * 5632), y(static_cast<size_t>(m) * 11264);
    for (float& e : x) e = normal(rng);
    A8Activations a2048, a5632;
    a8_quantize(x.data(), m, 2048, 2048, group, &a2048);
    a8_quantize(x.data(), m, 5632, 5632, group, &a5632);
    const double t = best_of([&] {
      for (size_t i = 0; i < layers.size(); ++i) {
        qlinear(shapes[i % 4].k == 2048 ? a2048 : a5632, layers[i], m, y.data(), pool);
      }
    }) / kLayers;
    double macs = 0;
    for (const Shape& s : shapes) macs += double(m) * s.n * s.k;
    std::printf("| %d | %.0f | %.1f |\n", m, 1e6 * t, macs / t / 1e9);
  }
  return 0;
}
