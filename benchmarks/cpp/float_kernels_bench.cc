// The float kernels of a small model, one thread: the linear at stories260K's shapes (qkv, o,
// gate_up, down, head) for 1, 5 and 16 rows, and the SiLU-multiply over rows of 172 and 1024
// channels. Each timing is the best of 5 runs of 20,000 calls, with hot caches.
//
//   cmake -S . -B build-bench -DACCELCORE_BUILD_BENCHMARKS=ON -DCMAKE_BUILD_TYPE=Release
//   cmake --build build-bench --target float_kernels_bench && build-bench/benchmarks/cpp/float_kernels_bench
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "backend/cpu/cpu_features.h"
#include "backend/cpu/ops.h"
#include "util/buffer.h"

using namespace accelcore;

namespace {

double best_us(const std::function<void()>& f) {
  constexpr int kCalls = 20000;
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kCalls; ++i) f();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, us / kCalls);
  }
  return best;
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> d(-1, 1);
  struct Shape {
    const char* name;
    int n, k;
  };
  const Shape shapes[] = {{"qkv", 128, 64}, {"o", 64, 64}, {"gate_up", 344, 64}, {"down", 64, 172}, {"head", 512, 64}};
  std::printf("path %s; float linear, us (GMAC/s)\n", cpu::isa_name(cpu::active_isa()));
  std::printf("| rows | qkv | o | gate_up | down | head | model (5 layers + head) per row |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (int m : {1, 5, 16}) {
    std::printf("| %d |", m);
    double model = 0;
    for (const Shape& s : shapes) {
      std::vector<float> w(static_cast<size_t>(s.n) * s.k);
      for (float& x : w) x = d(rng);
      FloatBuffer packed;
      packed.resize(cpu::linear_packed_size(s.n, s.k));
      cpu::linear_pack(w.data(), s.n, s.k, packed.data());
      std::vector<float> x(static_cast<size_t>(m) * s.k), y(static_cast<size_t>(m) * s.n);
      for (float& v : x) v = d(rng);
      const cpu::LinearParams p{x.data(), packed.data(), nullptr, y.data(), m, s.n, s.k, s.k, s.n};
      const double us = best_us([&] { cpu::linear_columns(p, 0, s.n); });
      std::printf(" %.3f (%.1f) |", us, static_cast<double>(m) * s.n * s.k / us / 1e3);
      model += (s.name[0] == 'h' ? 1 : 5) * us;
    }
    std::printf(" %.2f |\n", model / m);
  }
  std::printf("\nSiLU-multiply, one row; us (ns per channel)\n| channels | us |\n|---|---|\n");
  for (int ch : {172, 1024}) {
    std::vector<float> gu(2 * static_cast<size_t>(ch)), out(ch);
    for (float& v : gu) v = 3 * d(rng);
    const double us = best_us([&] { cpu::silu_mul(gu.data(), out.data(), 1, ch); });
    std::printf("| %d | %.3f (%.2f) |\n", ch, us, us * 1e3 / ch);
  }
  return 0;
}
