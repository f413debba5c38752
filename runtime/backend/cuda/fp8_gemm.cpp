#include "backend/cuda/fp8_gemm.h"

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace dsrt {

// ---- the library, opened once per process
struct Fp8Gemm::Lt {
#define DSRT_LT_FN(name) decltype(&::name) name = nullptr;
  DSRT_LT_FN(cublasLtCreate)
  DSRT_LT_FN(cublasLtDestroy)
  DSRT_LT_FN(cublasLtGetVersion)
  DSRT_LT_FN(cublasLtMatmulDescCreate)
  DSRT_LT_FN(cublasLtMatmulDescDestroy)
  DSRT_LT_FN(cublasLtMatmulDescSetAttribute)
  DSRT_LT_FN(cublasLtMatrixLayoutCreate)
  DSRT_LT_FN(cublasLtMatrixLayoutDestroy)
  DSRT_LT_FN(cublasLtMatmulPreferenceCreate)
  DSRT_LT_FN(cublasLtMatmulPreferenceDestroy)
  DSRT_LT_FN(cublasLtMatmulPreferenceSetAttribute)
  DSRT_LT_FN(cublasLtMatmulAlgoGetHeuristic)
  DSRT_LT_FN(cublasLtMatmul)
#undef DSRT_LT_FN
};

namespace {

const Fp8Gemm::Lt *load_lt(std::string *why) {
  static std::once_flag once;
  static Fp8Gemm::Lt lt;
  static std::string error;
  static bool ok = false;
  std::call_once(once, [] {
    const char *env = std::getenv("DSRT_CUBLASLT");  // an explicit path wins over the loader's search
    void *h = nullptr;
    for (const char *name : {env, "libcublasLt.so.13", "libcublasLt.so"})
      if (name && (h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) {
      error = "cuBLASLt not found (libcublasLt.so.13; set DSRT_CUBLASLT to its path)";
      return;
    }
    bool all = true;
#define DSRT_LT_LOAD(name)                                                    \
  lt.name = reinterpret_cast<decltype(lt.name)>(dlsym(h, #name));             \
  if (!lt.name) {                                                             \
    all = false;                                                              \
    error = std::string("cuBLASLt lacks ") + #name;                           \
  }
    DSRT_LT_LOAD(cublasLtCreate)
    DSRT_LT_LOAD(cublasLtDestroy)
    DSRT_LT_LOAD(cublasLtGetVersion)
    DSRT_LT_LOAD(cublasLtMatmulDescCreate)
    DSRT_LT_LOAD(cublasLtMatmulDescDestroy)
    DSRT_LT_LOAD(cublasLtMatmulDescSetAttribute)
    DSRT_LT_LOAD(cublasLtMatrixLayoutCreate)
    DSRT_LT_LOAD(cublasLtMatrixLayoutDestroy)
    DSRT_LT_LOAD(cublasLtMatmulPreferenceCreate)
    DSRT_LT_LOAD(cublasLtMatmulPreferenceDestroy)
    DSRT_LT_LOAD(cublasLtMatmulPreferenceSetAttribute)
    DSRT_LT_LOAD(cublasLtMatmulAlgoGetHeuristic)
    DSRT_LT_LOAD(cublasLtMatmul)
#undef DSRT_LT_LOAD
    // The VEC128 / BLK128x128 scale modes arrived in cuBLASLt 12.9.
    if (all && lt.cublasLtGetVersion() < 120900) {
      all = false;
      error = "cuBLASLt " + std::to_string(lt.cublasLtGetVersion()) + " predates block-scaled FP8 (12.9)";
    }
    ok = all;
  });
  if (!ok && why) *why = error;
  return ok ? &lt : nullptr;
}

}  // namespace

std::string cublaslt_status() {
  std::string why;
  const Fp8Gemm::Lt *lt = load_lt(&why);
  return lt ? "cuBLASLt " + std::to_string(lt->cublasLtGetVersion()) : why;
}

// ---- one (m, n, k) shape: descriptors and the chosen algorithm
struct Fp8Gemm::Plan {
  const Lt *lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false, f32_out = true;
  ~Plan() {
    if (!lt) return;
    if (desc) lt->cublasLtMatmulDescDestroy(desc);
    for (auto l : {a, b, d})
      if (l) lt->cublasLtMatrixLayoutDestroy(l);
  }
};

Fp8Gemm::Fp8Gemm(cudaStream_t stream) : stream_(stream) {
  lt_ = load_lt(&why_);
  if (!lt_) return;
  cublasLtHandle_t h = nullptr;
  if (lt_->cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    why_ = "cublasLtCreate failed";
    lt_ = nullptr;
    return;
  }
  handle_ = h;
  workspace_bytes_ = size_t(32) << 20;
  if (cudaMalloc(&workspace_, workspace_bytes_) != cudaSuccess) {
    cudaGetLastError();
    workspace_ = nullptr;
    workspace_bytes_ = 0;
  }
}

Fp8Gemm::~Fp8Gemm() {
  plans_.clear();
  if (lt_ && handle_) lt_->cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
  cudaFree(workspace_);
}

Fp8Gemm::Plan *Fp8Gemm::plan(int64_t m, int64_t n, int64_t k) {
  auto &slot = plans_[{m, n, k}];
  if (slot) return slot.get();
  slot = std::make_unique<Plan>();
  Plan &p = *slot;
  p.lt = lt_;
  // TN: the weight [N, K] row-major is A (col-major K x N, op T), activations [M, K] row-major are B
  // (col-major K x M), D col-major N x M = row-major [M, N] (spec §5.3, measured on an H100).
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  if (lt_->cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return &p;
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof a_mode);
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof b_mode);
  lt_->cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(n), k);
  lt_->cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(m), k);
  cublasLtMatmulPreference_t pref = nullptr;
  lt_->cublasLtMatmulPreferenceCreate(&pref);
  lt_->cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                            sizeof workspace_bytes_);
  for (cudaDataType_t out : {CUDA_R_32F, CUDA_R_16BF}) {  // fp32 output if offered, else BF16 + a widening pass
    if (p.d) lt_->cublasLtMatrixLayoutDestroy(p.d);
    p.d = nullptr;
    lt_->cublasLtMatrixLayoutCreate(&p.d, out, uint64_t(n), uint64_t(m), n);
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    if (lt_->cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p.desc, p.a, p.b, p.d, p.d, pref, 1,
                                            &res, &found) == CUBLAS_STATUS_SUCCESS &&
        found > 0) {
      p.algo = res.algo;
      p.ok = true;
      p.f32_out = out == CUDA_R_32F;
      break;
    }
  }
  lt_->cublasLtMatmulPreferenceDestroy(pref);
  return &p;
}

bool Fp8Gemm::run(const float *x, int64_t m, const kernels::DevMatrix &w, float *out, uint8_t *xq, float *xs, void *bf16) {
  if (!lt_ || !eligible(w) || m < 1) return false;
  const int64_t n = w.rows, k = w.cols;
  Plan *p = plan(m, n, k);
  if (!p->ok) return false;
  kernels::quantize_rows_fp8(x, m, k, xq, xs, stream_);
  const void *a_scale = w.scale, *b_scale = xs;
  lt_->cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale);
  lt_->cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale);
  const float alpha = 1.0f, beta = 0.0f;
  void *d = p->f32_out ? static_cast<void *>(out) : bf16;
  const cublasStatus_t st =
      lt_->cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, w.data, p->a, xq, p->b, &beta, d, p->d,
                          d, p->d, &p->algo, workspace_, workspace_bytes_, stream_);
  if (st != CUBLAS_STATUS_SUCCESS) {
    p->ok = false;  // never again for this shape
    return false;
  }
  if (!p->f32_out) kernels::bf16_to_f32(static_cast<const uint16_t *>(bf16), m * n, out, stream_);
  return true;
}

}  // namespace dsrt
