// Which SIMD level the CPU kernels run at: the best the machine supports, or a lower one forced
// by ACCELCORE_CPU_ISA=scalar|avx2|avx512 (tests use this to check every path).
#pragma once

namespace accelcore::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detected_isa();                 // what the hardware supports
Isa active_isa();                   // what the kernels use (env override applied, cached)
void set_active_isa(Isa isa);       // tests: pick a path; clamped to detected_isa()
const char* isa_name(Isa isa);

}  // namespace accelcore::cpu
