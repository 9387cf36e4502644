// Plain C++ interface to the CUDA parts, so module.cpp never needs CUDA headers or nvcc.
#pragma once

namespace lm_turbomind {

// Number of usable CUDA devices; 0 when there is no driver, no device, or any runtime error.
int cuda_device_count() noexcept;

}  // namespace lm_turbomind
