// Backend selection: the CPU backend always; the CUDA backend when this build has it and a GPU is present.
#include <unistd.h>

#include "backend/backend.h"
#include "core/memory.h"
#include "core/status.h"
#include "engine/sampler.h"

namespace dsrt {

// backend/cuda/device_query.cu (a stub without CUDA): usable devices, or 0 and why not.
int cuda_device_count(std::string *why);
uint64_t cuda_free_memory(int device);

#if defined(DSRT_WITH_CUDA)
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions &opt);  // backend/cuda/cuda_backend.cpp
#endif

int cuda_devices(std::string *why) { return cuda_device_count(why); }

std::vector<SampleResult> Backend::sample_rows(Tensor logits, const std::vector<SampleRequest> &rows) {
  const int64_t V = logits.cols;
  static const std::vector<int32_t> none;
  std::vector<SampleResult> out(rows.size());
  HostVec<float> host(static_cast<size_t>(V));
  for (size_t i = 0; i < rows.size(); i++) {
    const SampleRequest &r = rows[i];
    if (r.row < 0 || r.row >= logits.rows) failf(DSRT_ERR_INTERNAL, "sample_rows: row ", r.row, " of ", logits.rows);
    to_host(logits.rows_view(r.row, 1), host.data());
    try {
      out[i].token = sample_token_with(host.data(), V, *r.params, r.history, r.n_history, r.banned ? *r.banned : none, r.u);
    } catch (const Error &e) {
      out[i].status = e.code();
      out[i].error = e.what();
    }
  }
  return out;
}

void Backend::check_fp8_rows(const Tensor &x, const Tensor &q, const Tensor &s) {
  if (x.cols % 128 || q.dtype != DType::F8_E4M3 || q.rows != x.rows || q.cols != x.cols || s.rows != x.rows ||
      s.cols != x.cols / 128)
    fail(DSRT_ERR_INTERNAL, "FP8 rows: shapes or dtypes differ");
}

// (A backend whose moe_takes_fp8 is always false is never asked.)
void Backend::quantize_fp8_rows(Tensor, Tensor, Tensor) {
  failf(DSRT_ERR_INTERNAL, "the ", name(), " backend does not quantise rows to FP8");
}
void Backend::dequantize_fp8_rows(Tensor, Tensor, Tensor) {
  failf(DSRT_ERR_INTERNAL, "the ", name(), " backend does not dequantise FP8 rows");
}

uint64_t device_free_memory(Device d) {
  if (d.kind == Device::Cuda) return cuda_free_memory(d.index);
  const long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? uint64_t(pages) * uint64_t(size) : 0;
}

std::shared_ptr<DeviceWeights> DeviceWeightRegistry::get_or_make(Device device,
                                                                 const std::function<std::shared_ptr<DeviceWeights>()> &make) {
  std::lock_guard lk(mu_);
  for (auto &[d, s] : stores_)
    if (d == device) return s;
  return stores_.emplace_back(device, make()).second;
}

std::vector<std::pair<Device, size_t>> DeviceWeightRegistry::usage() const {
  std::lock_guard lk(mu_);
  std::vector<std::pair<Device, size_t>> v;
  for (auto &[d, s] : stores_) v.push_back({d, s->bytes()});
  return v;
}

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
