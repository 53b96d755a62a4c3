#include "backend/cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "util/check.h"

namespace accelcore::cpu {

Isa detected_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

static Isa initial_isa() {
  Isa best = detected_isa();
  const char* env = std::getenv("ACCELCORE_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else ACCEL_THROW(InvalidArgument) << "ACCELCORE_CPU_ISA must be scalar, avx2 or avx512, got '" << env << "'";
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

static std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  Isa best = detected_isa();
  isa_slot().store(static_cast<int>(static_cast<int>(isa) < static_cast<int>(best) ? isa : best));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

}  // namespace accelcore::cpu
