// Which SIMD level the CPU kernels run at: the best the machine supports, or a lower one forced
// by ACCELCORE_CPU_ISA=scalar|avx2|avx512 (tests use this to check every path); the integer
// kernels' level likewise (DotIsa).
#pragma once

namespace accelcore::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detected_isa();                 // what the hardware supports
Isa active_isa();                   // what the kernels use (env override applied, cached)
void set_active_isa(Isa isa);       // tests: pick a path; clamped to detected_isa()
const char* isa_name(Isa isa);

// The integer dot products of the quantized kernels: the best the machine has, never above the
// float level in use (ACCELCORE_CPU_ISA=scalar makes them scalar too), or one forced by
// ACCELCORE_CPU_DOT=scalar|avx2|avxvnni|avx512vnni (an error if the machine lacks it).
enum class DotIsa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };
bool dot_isa_supported(DotIsa isa);  // by the hardware
DotIsa active_dot_isa();
void set_active_dot_isa(DotIsa isa);  // tests: throws InvalidArgument if unsupported
const char* dot_isa_name(DotIsa isa);

}  // namespace accelcore::cpu
