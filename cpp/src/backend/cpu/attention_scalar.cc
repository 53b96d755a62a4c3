// Paged attention for the scalar path (see attention_impl.h; compiler flags set per file in CMake).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/ops.h"
#include "quant/kvq.h"

namespace accelcore::cpu {
namespace scalar_impl {
#include "backend/cpu/attention_impl.h"
}  // namespace scalar_impl

void attention_scalar(const AttentionParams& p, int64_t item_begin, int64_t item_end) {
  scalar_impl::attend_items(p, item_begin, item_end);
}

}  // namespace accelcore::cpu
