// The CUDA backend's host-side face. Built from cuda_backend.cu when CUDA is enabled, or from
// no_cuda.cc otherwise: the same symbols either way, so the rest of the library never needs #ifdefs.
#pragma once

#include <string>

namespace accelcore::cuda {

bool compiled();              // this build carries CUDA kernels
int device_count();           // usable devices; 0 when there is no driver or no GPU (never throws)
std::string status_message(); // why device_count() is 0, for error messages

// y[i] = a * x[i] + y[i] on device memory: the smallest kernel that proves the toolchain, the
// architecture list and a launch work end to end (tests run it where a GPU exists).
void saxpy(int n, float a, const float* x_device, float* y_device);

}  // namespace accelcore::cuda
