// The CUDA backend's smallest end-to-end proof: saxpy on a real device where one exists. Without a
// GPU the device test skips with a message; without a CUDA build every entry point still answers
// (0 devices, Unsupported) instead of crashing.
#include <accelcore/accelcore.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cuda/cuda_backend.h"

#if defined(ACCELCORE_TEST_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace accelcore {
namespace {

TEST(CudaBackend, BuildFlavourIsReportedConsistently) {
  EXPECT_EQ(cuda_compiled(), cuda::compiled());
  EXPECT_FALSE(cuda::status_message().empty());
  if (!cuda::compiled()) {
    // The stub: no devices, and every entry point says so instead of crashing.
    EXPECT_EQ(cuda::device_count(), 0);
    EXPECT_FALSE(cuda_available());
    float x = 1.0f, y = 2.0f;
    EXPECT_THROW(cuda::saxpy(1, 2.0f, &x, &y), Unsupported);
    EXPECT_EQ(y, 2.0f);  // untouched
  }
}

TEST(CudaBackend, DeviceCountNeverThrows) {
  int n = -1;
  EXPECT_NO_THROW(n = cuda::device_count());
  EXPECT_GE(n, 0);
  EXPECT_EQ(cuda_available(), cuda::compiled() && n > 0);
  EXPECT_EQ(cuda_compiled(), cuda::compiled());
}

TEST(CudaBackend, SaxpyWithoutADeviceThrowsInsteadOfCrashing) {
  // Stub build: Unsupported. CUDA build on a machine without a GPU or driver: the failed launch
  // becomes an accelcore error. (With a GPU, the Saxpy test below covers the real path.)
  if (cuda::device_count() == 0) {
    EXPECT_THROW(cuda::saxpy(1, 2.0f, nullptr, nullptr), Error);  // the pointers are never dereferenced
    EXPECT_EQ(cuda::device_count(), 0);                            // and asking again is still fine
  }
  EXPECT_THROW(cuda::saxpy(-1, 2.0f, nullptr, nullptr), Error);  // bad n: refused on any build
}

TEST(CudaBackend, Saxpy) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU on this machine";
#if !defined(ACCELCORE_TEST_WITH_CUDA)
  FAIL() << "a device is reported but the test was built without CUDA";
#else
  // An odd size that is not a multiple of the block size, so the bounds check matters.
  const int n = (1 << 20) + 3;
  const float a = 2.5f;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) {
    x[i] = dist(rng);
    y[i] = dist(rng);
  }
  float *dx = nullptr, *dy = nullptr;
  ASSERT_EQ(cudaMalloc(&dx, n * sizeof(float)), cudaSuccess);
  // One guard element past the end must stay untouched.
  ASSERT_EQ(cudaMalloc(&dy, (n + 1) * sizeof(float)), cudaSuccess);
  const float guard = 777.0f;
  ASSERT_EQ(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dy, y.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dy + n, &guard, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);

  cuda::saxpy(n, a, dx, dy);
  cuda::saxpy(0, a, dx, dy);  // n == 0 is a no-op
  EXPECT_THROW(cuda::saxpy(-1, a, dx, dy), InvalidArgument);

  std::vector<float> out(n + 1);
  ASSERT_EQ(cudaMemcpy(out.data(), dy, (n + 1) * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dx);
  cudaFree(dy);
  for (int i = 0; i < n; ++i) {
    const double want = static_cast<double>(a) * x[i] + y[i];
    ASSERT_NEAR(out[i], want, 1e-6 * (1.0 + std::abs(want))) << "i=" << i;
  }
  EXPECT_EQ(out[n], guard);
#endif
}

}  // namespace
}  // namespace accelcore
