#include "backend/cuda/fp8_gemm.h"

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "backend/backend.h"
#include "core/log.h"

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

double fp8_gemm_tflops(int device, int64_t m, int64_t n, int64_t k) {
  if (cudaSetDevice(device) != cudaSuccess || k % 128 || n % 16) return 0.0;
  cudaStream_t st = nullptr;
  if (cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) != cudaSuccess) return 0.0;
  double tflops = 0.0;
  {
    Fp8Gemm g(st);
    const int64_t mp = Fp8Gemm::padded_rows(m);
    void *w = nullptr, *ws = nullptr, *x = nullptr, *out = nullptr, *xq = nullptr, *xs = nullptr, *tmp = nullptr;
    const int64_t ld = (k / 128 + 3) / 4 * 4;  // block-scale rows padded to a multiple of 4 (cuda_backend.cpp)
    const size_t sb = size_t((n + 127) / 128 * ld) * sizeof(float);
    bool ok = g.available() && cudaMalloc(&w, size_t(n * k)) == cudaSuccess && cudaMalloc(&ws, sb) == cudaSuccess &&
              cudaMalloc(&x, size_t(m * k) * 4) == cudaSuccess && cudaMalloc(&out, size_t(m * n) * 4) == cudaSuccess &&
              cudaMalloc(&xq, size_t(mp * k)) == cudaSuccess && cudaMalloc(&xs, size_t(mp * k / 128) * 4) == cudaSuccess &&
              cudaMalloc(&tmp, size_t(mp * n) * 4) == cudaSuccess;
    if (ok) {
      cudaMemsetAsync(w, 0x38, size_t(n * k), st);  // e4m3 0x38 = 1.0
      cudaMemsetAsync(ws, 0, sb, st);
      cudaMemsetAsync(x, 0, size_t(m * k) * 4, st);
      kernels::DevMatrix dm;
      dm.data = w;
      dm.dtype = kernels::kFP8;
      dm.rows = n;
      dm.cols = k;
      dm.scale = static_cast<const float *>(ws);
      dm.scale_cols = ld;
      auto once = [&] {
        return g.run(static_cast<const float *>(x), m, dm, static_cast<float *>(out), static_cast<uint8_t *>(xq),
                     static_cast<float *>(xs), tmp);
      };
      cudaEvent_t e0 = nullptr, e1 = nullptr;
      if (once() && cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess) {
        const int reps = 10;
        cudaEventRecord(e0, st);
        for (int r = 0; r < reps; r++) once();
        cudaEventRecord(e1, st);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (ms > 0) tflops = 2.0 * double(m) * double(n) * double(k) * reps / (double(ms) * 1e-3) / 1e12;
      }
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
      cudaStreamSynchronize(st);
      g.release();
    }
    for (void *p : {w, ws, x, out, xq, xs, tmp}) cudaFree(p);
  }
  cudaStreamDestroy(st);
  cudaGetLastError();
  return tflops;
}

std::string cublaslt_status() {
  std::string why;
  const Fp8Gemm::Lt *lt = load_lt(&why);
  return lt ? "cuBLASLt " + std::to_string(lt->cublasLtGetVersion()) : why;
}

// ---- one (m, n, k) shape: descriptors and the chosen algorithm
struct Fp8Gemm::Plan {
  const Lt *lt = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false, f32_out = true;
  ~Plan() { reset(); }
  void reset() {
    if (!lt) return;
    if (desc) lt->cublasLtMatmulDescDestroy(desc);
    for (auto l : {a, b, c, d})
      if (l) lt->cublasLtMatrixLayoutDestroy(l);
    desc = nullptr;
    a = b = c = d = nullptr;
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
  if (lt_) release();
  plans_.clear();
  if (lt_ && handle_) lt_->cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
  cudaFree(workspace_);
}

// The operation descriptor: TN, fp32 compute, block-scaled FP8 (weights BLK128x128 as A, activations
// VEC128 as B), fast accumulation off (the scaled partials are promoted to fp32 every 128 K, spec §5.3).
static cublasLtMatmulDesc_t make_desc(const Fp8Gemm::Lt *lt, const void *a_scale, const void *b_scale) {
  cublasLtMatmulDesc_t desc = nullptr;
  if (lt->cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return nullptr;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  const int8_t fast_accum = 0;
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum, sizeof fast_accum);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof a_mode);
  lt->cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof b_mode);
  return desc;
}

void Fp8Gemm::release() {
  for (void *d : used_descs_) lt_->cublasLtMatmulDescDestroy(static_cast<cublasLtMatmulDesc_t>(d));
  used_descs_.clear();
}

Fp8Gemm::Plan *Fp8Gemm::plan(int64_t m, int64_t n, int64_t k) {
  auto &slot = plans_[{m, n, k}];
  if (slot) return slot.get();
  slot = std::make_unique<Plan>();
  Plan &p = *slot;
  p.lt = lt_;
  std::string tried;
  cublasLtMatmulPreference_t pref = nullptr;
  lt_->cublasLtMatmulPreferenceCreate(&pref);
  lt_->cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                            sizeof workspace_bytes_);
  // Two ways to put the problem, both TN with K contiguous. Weights as A (BLK128x128) and activations as B
  // (VEC128) give D = [M, N] row-major directly (spec §5.3); the other assignment gives D = [N, M] and a
  // transpose. Each with fp32 output if offered, else BF16 and a widening pass.
  struct Try {
    cudaDataType_t c, d;
  };
  // Weights as A (BLK128x128), activations as B (VEC128): D = [M, N] row-major (spec §5.3).
  const Try tries[] = {{CUDA_R_32F, CUDA_R_32F}, {CUDA_R_16BF, CUDA_R_32F}, {CUDA_R_16BF, CUDA_R_16BF}};
  for (const Try &t : tries) {
    p.reset();
    p.desc = make_desc(lt_, workspace_, workspace_);  // the scale pointers must be set for the heuristic
    cublasStatus_t st = CUBLAS_STATUS_INTERNAL_ERROR;
    if (p.desc) {
      lt_->cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(n), k);
      lt_->cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, uint64_t(k), uint64_t(m), k);
      lt_->cublasLtMatrixLayoutCreate(&p.c, t.c, uint64_t(n), uint64_t(m), n);
      lt_->cublasLtMatrixLayoutCreate(&p.d, t.d, uint64_t(n), uint64_t(m), n);
      cublasLtMatmulHeuristicResult_t res{};
      int found = 0;
      st = lt_->cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p.desc, p.a, p.b, p.c, p.d, pref, 1,
                                                &res, &found);
      if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
        p.algo = res.algo;
        p.ok = true;
        p.f32_out = t.d == CUDA_R_32F;
        break;
      }
    }
    tried += std::string(tried.empty() ? "" : ", ") + (t.c == CUDA_R_32F ? "C f32" : "C bf16") +
             (t.d == CUDA_R_32F ? " D f32" : " D bf16") + ": status " + std::to_string(int(st));
  }
  lt_->cublasLtMatmulPreferenceDestroy(pref);
  if (p.ok && std::getenv("DSRT_DEBUG_GEMM"))
    log(LogLevel::Debug, "dsrt: FP8 GEMM plan M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" +
                             std::to_string(k) + ": D " + (p.f32_out ? "f32" : "bf16"));
  if (!p.ok)  // once per shape: the fallback is correct but slower, so say why
    log(LogLevel::Warn, "dsrt: cuBLASLt offers no block-scaled FP8 algorithm for M=" + std::to_string(m) + " N=" +
                            std::to_string(n) + " K=" + std::to_string(k) + " (" + tried + "); using dsrt's kernels");
  return &p;
}

bool Fp8Gemm::run(const float *x, int64_t m, const kernels::DevMatrix &w, float *out, uint8_t *xq, float *xs, void *tmp) {
  if (!lt_ || !eligible(w) || m < 1) return false;
  // cuBLASLt takes VEC128-scaled activations only in whole 16-row tiles (M=33 is NOT_SUPPORTED): pad with
  // zero rows (zero scales), and drop their outputs.
  const int64_t n = w.rows, k = w.cols, mp = padded_rows(m);
  Plan *p = plan(mp, n, k);
  if (!p->ok) return false;
  if (mp > m) {
    cudaMemsetAsync(xq + m * k, 0, size_t((mp - m) * k), stream_);
    cudaMemsetAsync(xs, 0, size_t(k / 128 * mp) * sizeof(float), stream_);
  }
  kernels::quantize_rows_fp8(x, m, k, mp, xq, xs, stream_);
  // A fresh descriptor per call, kept until the stream has run it. With one descriptor per shape whose scale
  // pointers were reset before each call, whole-model runs went wrong (relative error ~0.7) while a single
  // GEMM of each shape was exact; a descriptor read after the call returns is the suspect (not yet
  // confirmed on hardware: see docs/perf.md).
  cublasLtMatmulDesc_t desc = make_desc(lt_, w.scale, xs);
  if (!desc) return false;
  used_descs_.push_back(desc);
  const float alpha = 1.0f, beta = 0.0f;
  const bool direct = p->f32_out && mp == m;
  void *d = direct ? static_cast<void *>(out) : tmp;
  const cublasStatus_t st = lt_->cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), desc, &alpha, w.data, p->a, xq, p->b,
                                                &beta, d, p->c, d, p->d, &p->algo, workspace_, workspace_bytes_, stream_);
  if (st != CUBLAS_STATUS_SUCCESS) {
    log(LogLevel::Warn, "dsrt: cublasLtMatmul failed (status " + std::to_string(int(st)) + ") for M=" +
                            std::to_string(mp) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
                            "; using dsrt's kernels");
    p->ok = false;  // never again for this shape
    return false;
  }
  if (!direct)  // D is [mp, N], fp32 or bf16 -> fp32 [m, N]
    kernels::widen_rows(tmp, !p->f32_out, m, n, n, out, stream_);
  return true;
}

// ---- BF16 x BF16 -> fp32, TN (no scales): one descriptor per shape, made with its plan.
Fp8Gemm::Plan *Fp8Gemm::plan_bf16(int64_t m, int64_t n, int64_t k) {
  auto &slot = bf16_plans_[{m, n, k}];
  if (slot) return slot.get();
  slot = std::make_unique<Plan>();
  Plan &p = *slot;
  p.lt = lt_;
  if (lt_->cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return &p;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  lt_->cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  lt_->cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, uint64_t(k), uint64_t(n), k);
  lt_->cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, uint64_t(k), uint64_t(m), k);
  lt_->cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, uint64_t(n), uint64_t(m), n);
  lt_->cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32F, uint64_t(n), uint64_t(m), n);
  cublasLtMatmulPreference_t pref = nullptr;
  lt_->cublasLtMatmulPreferenceCreate(&pref);
  lt_->cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                            sizeof workspace_bytes_);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = lt_->cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p.desc, p.a, p.b,
                                                                 p.c, p.d, pref, 1, &res, &found);
  lt_->cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    p.algo = res.algo;
    p.ok = true;
  } else {
    log(LogLevel::Warn, "dsrt: cuBLASLt offers no BF16 algorithm for M=" + std::to_string(m) + " N=" + std::to_string(n) +
                            " K=" + std::to_string(k) + " (status " + std::to_string(int(st)) + "); using dsrt's kernels");
  }
  return &p;
}

bool Fp8Gemm::run_bf16(const float *x, int64_t m, const kernels::DevMatrix &w, float *out, uint16_t *xb) {
  if (w.dtype != kernels::kBF16 || m < 1 || w.cols % 8) return false;
  const int64_t n = w.rows, k = w.cols;
  // Decode batches up to kCudaBf16SwapAbMaxRows on dsrt's swap-AB BF16 kernel, which reads the weight once per call
  // (cuBLASLt took 1.26 ms at 32 rows for the lm_head, 0.44 ms of reading on an H200); not for a matrix of too
  // few 128-row blocks to occupy half the SMs (the kernel does not split K). Without cuBLASLt, up to 256 rows.
  // DSRT_BF16_MMA=0 leaves every size to cuBLASLt (for comparisons: dsrt bench --ops).
  static const bool mma_off = [] {
    const char *e = std::getenv("DSRT_BF16_MMA");
    return e && std::string(e) == "0";
  }();
  const bool aligned = (reinterpret_cast<uintptr_t>(w.data) | reinterpret_cast<uintptr_t>(xb)) % 16 == 0;
  const bool mine = kernels::gemm_bf16_mma_supported(m, n, k) &&
                    (!lt_ || (!mma_off && m <= kCudaBf16SwapAbMaxRows && kernels::gemm_bf16_mma_fills_gpu(n)));
  if (aligned && mine) {
    kernels::round_to_bf16(x, m * k, xb, stream_);
    kernels::gemm_bf16_mma(xb, m, w, out, n, stream_);
    return true;
  }
  if (!lt_) return false;
  Plan *p = plan_bf16(m, n, k);
  if (!p->ok) return false;
  kernels::round_to_bf16(x, m * k, xb, stream_);
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t st = lt_->cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, w.data, p->a, xb,
                                                p->b, &beta, out, p->c, out, p->d, &p->algo, workspace_, workspace_bytes_,
                                                stream_);
  if (st != CUBLAS_STATUS_SUCCESS) {
    log(LogLevel::Warn, "dsrt: cublasLtMatmul (BF16) failed (status " + std::to_string(int(st)) + ") for M=" +
                            std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) + "; using dsrt's kernels");
    p->ok = false;
    return false;
  }
  return true;
}

}  // namespace dsrt
