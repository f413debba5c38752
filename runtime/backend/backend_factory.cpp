// Backend selection: the CPU backend always; the CUDA backend when this build has it and a GPU is present.
#include "api/system_info.h"
#include "backend/backend.h"
#include "core/status.h"

namespace dsrt {

#if defined(DSRT_WITH_CUDA)
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions &opt);  // backend/cuda/cuda_backend.cpp
#endif

int cuda_devices(std::string *why) { return cuda_device_count(why); }

std::string op_label_of_weight(const std::string &name) {
  std::string out, part;
  auto flush = [&] {
    const bool number = !part.empty() && part.find_first_not_of("0123456789") == std::string::npos;
    if (!part.empty() && !number && part != "model" && part != "layers" && part != "weight")
      out += (out.empty() ? "" : ".") + part;
    part.clear();
  };
  for (char c : name) {
    if (c == '.') flush();
    else part += c;
  }
  flush();
  return out.empty() ? name : out;
}

std::unique_ptr<Backend> make_backend(BackendKind kind, const BackendOptions &opt) {
  if (kind == BackendKind::Cpu) return make_cpu_backend(opt);
  std::string why;
  const int n = cuda_device_count(&why);
  if (n == 0) fail(DSRT_ERR_NO_DEVICE, "the CUDA backend is not available: " + why);
  if (opt.device < 0 || opt.device >= n) failf(DSRT_ERR_NO_DEVICE, "CUDA device ", opt.device, " does not exist (", n, " found)");
#if defined(DSRT_WITH_CUDA)
  return make_cuda_backend(opt);
#else
  fail(DSRT_ERR_NO_DEVICE, "this build of dsrt has no CUDA backend");
#endif
}

}  // namespace dsrt
