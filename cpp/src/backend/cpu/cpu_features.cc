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

bool dot_isa_supported(DotIsa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case DotIsa::kScalar: return true;
    case DotIsa::kAvx2: return avx2;
    case DotIsa::kAvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
    case DotIsa::kAvx512Vnni: return detected_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == DotIsa::kScalar;
}

const char* dot_isa_name(DotIsa isa) {
  switch (isa) {
    case DotIsa::kScalar: return "scalar";
    case DotIsa::kAvx2: return "avx2";
    case DotIsa::kAvxVnni: return "avxvnni";
    case DotIsa::kAvx512Vnni: return "avx512vnni";
  }
  return "?";
}

static DotIsa initial_dot_isa() {
  const char* env = std::getenv("ACCELCORE_CPU_DOT");
  if (env != nullptr && *env != '\0') {
    for (DotIsa isa : {DotIsa::kScalar, DotIsa::kAvx2, DotIsa::kAvxVnni, DotIsa::kAvx512Vnni}) {
      if (std::strcmp(env, dot_isa_name(isa)) != 0) continue;
      ACCEL_CHECK(dot_isa_supported(isa), InvalidArgument)
          << "ACCELCORE_CPU_DOT=" << env << " but this CPU does not support it";
      return isa;
    }
    ACCEL_THROW(InvalidArgument) << "ACCELCORE_CPU_DOT must be scalar, avx2, avxvnni or avx512vnni, got '" << env << "'";
  }
  // The best supported, within the float level in use.
  const Isa level = active_isa();
  if (level == Isa::kAvx512 && dot_isa_supported(DotIsa::kAvx512Vnni)) return DotIsa::kAvx512Vnni;
  if (level != Isa::kScalar && dot_isa_supported(DotIsa::kAvxVnni)) return DotIsa::kAvxVnni;
  if (level != Isa::kScalar && dot_isa_supported(DotIsa::kAvx2)) return DotIsa::kAvx2;
  return DotIsa::kScalar;
}

static std::atomic<int>& dot_isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_dot_isa())};
  return slot;
}

DotIsa active_dot_isa() { return static_cast<DotIsa>(dot_isa_slot().load(std::memory_order_relaxed)); }

void set_active_dot_isa(DotIsa isa) {
  ACCEL_CHECK(dot_isa_supported(isa), InvalidArgument) << "this CPU does not support " << dot_isa_name(isa);
  dot_isa_slot().store(static_cast<int>(isa));
}

}  // namespace accelcore::cpu
