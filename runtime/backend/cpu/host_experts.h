// Routed experts computed on the host, for expert offload (issue #11): the experts that a step needs and that the
// cost model (backend/offload_cost.h) leaves on the CPU are read in place from the mapped checkpoint and
// computed on every core while the GPU runs the rest of the layer; the GPU adds the result to its own.
//
// The arithmetic is the CPU backend's moe_experts restricted to the chosen experts (cpu_kernels.h: the same
// products, SwiGLU, FP8 activation rounding and weighted sum, each token's experts added in ascending id), so
// the output equals CpuBackend::moe_experts run on a copy of the expert list with the other experts absent, bit
// for bit, in fp32 and in FP8-activation mode, whatever the thread count.
//
// Work is cut into (expert, block of 16 output rows) items over all experts at once, so one expert with many
// tokens and many experts with one token both keep every core streaming weights.
#pragma once
#include <cstdint>
#include <vector>

#include "core/thread_pool.h"
#include "model/weights.h"

namespace dsrt {

class HostExperts {
 public:
  // n_threads <= 0: all hardware threads (the calling thread works too).
  explicit HostExperts(int n_threads = 0);

  int threads() const { return pool_.size(); }

  // out[t, :] (T x H, overwritten) = sum over j in [0, K) with on_cpu[ids[t, j]] of w[t, j] SwiGLU_e(x[t, :]), e =
  // ids[t, j], in ascending e; experts[e] with no gate weight (another rank's) count as not chosen. on_cpu: E =
  // experts.size() flags, nullptr = all. fp8_activations: BackendOptions::fp8_activations; as on the GPU, x and the
  // SwiGLU output are rounded to FP8 activations when T (the step's tokens, whatever each expert receives) is at
  // least kFp8ActivationMinRows. An id outside [0, E) is DSRT_ERR_INTERNAL. Scratch is kept between calls, so one
  // run at a time per object; the call blocks until out is written (the caller overlaps it with queued GPU work).
  void run(const float *x, int64_t T, int64_t H, const int32_t *ids, const float *w, int64_t K,
           const std::vector<FfnWeights> &experts, const uint8_t *on_cpu, bool fp8_activations, float *out);

  // Weight bytes of the experts the last run computed (each once; FP8 scales excluded): what it streamed from DRAM.
  int64_t last_weight_bytes() const { return last_bytes_; }

  // run()'s arithmetic rate when compute-bound, in flop/s (offload::Rates::cpu_flops): 64 tokens through 8 random
  // FP8 experts of V3's hidden size, 7168 -> 256 -> 7168 (44 MB, 128 flops per weight byte), the best of 3 runs
  // after a warm-up: 22 GFLOP in all (about 0.5 s on 2 cores).
  double measure_flops();

  // gate + up + down bytes in the checkpoint's dtype (scales excluded).
  static int64_t weight_bytes(const FfnWeights &f);

 private:
  // A run of one expert's (token, expert) slots, its tokens ascending, at most kBatchRows of them.
  struct Piece {
    int32_t e;
    int64_t slot0, n;  // slots [slot0, slot0 + n) of slot_tok_ / slot_w_
    int64_t h0;        // offset of the piece's [n, I_e] SwiGLU block in hs_ / us_
  };
  // The pieces_ (their rows row_start_[i] .. row_start_[i + 1] of the batch): inputs, gate/up/SwiGLU, down, sum.
  void run_batch(const float *x, int64_t T, int64_t H, const std::vector<FfnWeights> &experts, bool quantise_x,
                 bool fp8_activations, int64_t hsz, float *out);

  ThreadPool pool_;
  int64_t last_bytes_ = 0;
  // Scratch kept between calls: slots grouped by expert (start_ per expert), the batch's pieces and the prefix
  // sums of its rows and work items, per-token lists of the batch's rows, its activations.
  std::vector<int64_t> start_, cursor_, row_start_, up_items_, down_items_, tok_start_, tok_row_;
  std::vector<int32_t> slot_tok_, toks_;
  std::vector<float> slot_w_;
  std::vector<Piece> pieces_;
  std::vector<float> xs_, hs_, us_, ys_;  // [rows, H], [rows, I_e] per piece (SwiGLU in hs_), [rows, H]
};

}  // namespace dsrt
