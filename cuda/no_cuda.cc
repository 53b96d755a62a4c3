// Stub CUDA backend for builds without nvcc (ACCELCORE_CUDA=OFF, or AUTO with no compiler).
#include <accelcore/errors.h>

#include "cuda_backend.h"

namespace accelcore::cuda {

bool compiled() { return false; }
int device_count() { return 0; }
std::string status_message() { return "accelcore was built without CUDA"; }
void saxpy(int, float, const float*, float*) { throw Unsupported("accelcore was built without CUDA"); }

}  // namespace accelcore::cuda
