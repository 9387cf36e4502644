#include <pybind11/pybind11.h>

#include <string>

#ifdef LM_TURBOMIND_WITH_CUDA
#include "cuda_config.h"
#include "cuda_probe.h"
#endif

namespace py = pybind11;

namespace {

bool has_cuda() {
#ifdef LM_TURBOMIND_WITH_CUDA
  return lm_turbomind::cuda_device_count() > 0;
#else
  return false;
#endif
}

py::dict build_info() {
  py::dict info;
#ifdef LM_TURBOMIND_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch"] = LM_TURBOMIND_CUDA_ARCHS;
  info["cuda_version"] = LM_TURBOMIND_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_arch"] = "";
  info["cuda_version"] = "";
#endif
  info["compiler"] = LM_TURBOMIND_COMPILER;
  info["cxx_standard"] = LM_TURBOMIND_CXX_STANDARD;
  info["build_type"] = LM_TURBOMIND_BUILD_TYPE;
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Compiled core of lm_turbomind (C++17, optional CUDA).";
  m.def("version", [] { return std::string(LM_TURBOMIND_VERSION); },
        "Version of the compiled extension; equals lm_turbomind.__version__.");
  // The first CUDA runtime call initialises the driver and can take a while; let other Python threads run.
  m.def("has_cuda", &has_cuda, py::call_guard<py::gil_scoped_release>(),
        "True only if built with CUDA and a CUDA device is usable right now.");
  m.def("build_info", &build_info,
        "How this extension was built: cuda, cuda_arch, cuda_version, compiler, cxx_standard, build_type.");
}
