#include <cuda_runtime.h>

#include "cuda_probe.h"

namespace lm_turbomind {

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    // A failed query leaves a sticky last-error; clear it so later CUDA calls do not report it as theirs.
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace lm_turbomind
