// Paged attention for the avx2 path (see attention_impl.h; compiler flags set per file in CMake).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/ops.h"
#include "quant/kvq.h"

namespace accelcore::cpu {
namespace avx2_impl {
#include "backend/cpu/attention_impl.h"
}  // namespace avx2_impl

void attention_avx2(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  avx2_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
