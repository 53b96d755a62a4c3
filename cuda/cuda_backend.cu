// CUDA backend entry points. Every runtime call is checked; failures become accelcore exceptions,
// and a missing driver or GPU is reported as zero devices, never an abort.
#include <accelcore/errors.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda_backend.h"

namespace accelcore::cuda {
namespace {

struct SaxpyParams {
  int n;
  float a;
  const float* x;
  float* y;
};

__global__ void saxpy_kernel(SaxpyParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) p.y[i] = p.a * p.x[i] + p.y[i];
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

bool compiled() { return true; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error left by a missing driver
    return 0;
  }
  return n;
}

std::string status_message() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(err);
  }
  return n > 0 ? std::to_string(n) + " device(s)" : "no CUDA device found";
}

void saxpy(int n, float a, const float* x, float* y) {
  if (n < 0) throw InvalidArgument("saxpy: n must be >= 0");
  if (n == 0) return;
  SaxpyParams p{n, a, x, y};
  saxpy_kernel<<<(n + 255) / 256, 256>>>(p);
  check(cudaGetLastError(), "saxpy launch");
  check(cudaDeviceSynchronize(), "saxpy");
}

}  // namespace accelcore::cuda
