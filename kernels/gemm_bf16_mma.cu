// BF16 GEMM on tensor cores (mma.sync m16n8k16 bf16, fp32 accumulation) for decode batches: the BF16 member
// of gemm_fp8_mma.cu's swap-AB family, made for the lm_head (7168 -> 129280, 1.85 GB): out[t, n] =
// sum_k xb[t, k] w[n, k] for t < m, n < N, with xb the activations as round_to_bf16 makes them.
//
// Swap-AB, as in gemm_fp8_mma.cu: the weight rows are the MMA's M side (16 per MMA) and the tokens its N side
// (8 per MMA). A block owns 128 weight rows and a tile of BT tokens (8, 16, 32, 64 or 128): for m <= 128 one
// token tile covers the whole batch, so each weight byte is read from memory once per call. For 128 < m <=
// 256 there are two token tiles of 128; the grid's x is the token tile (the fast index), so the two blocks
// of one weight tile are launched one after the other and run at the same time: the second one's weight
// reads are mostly L2 hits (a second DRAM read of part of the weight at worst).
//
// Warps. 8 warps (256 threads) split the block's 128 rows x BT tokens into WM x WN warp tiles: BT <= 32:
// 8 x 1 (warp w: rows 16w.., all tokens); BT >= 64: 4 x 2 (warp w: rows 32 (w % 4).., tokens (w / 4) BT / 2..)
// - shared memory is read (rows + tokens) x 32 bytes per warp per k16 step, so squarer warp tiles read less
// of it per MMA (at BT = 128: 96 instead of 144 rows' worth per warp; at m = 128 the kernel is close to
// the shared-memory and mma.sync limits as well as to the DRAM one).
//
// Accumulation. One fp32 result per output over all of K, but the tensor core's own sums are kept within one
// K tile of 64 (4 MMAs on a fresh accumulator) and then added to the result with an ordinary fp32 add: the
// tensor core truncates its sums (round toward zero: Fasi et al. 2021 for V100-A100), a bias that over
// 448 chained MMAs (K = 7168) could reach ~1e-5 relative, where one truncated partial per 64 K keeps it near
// 1e-6 and the 112 round-to-nearest adds are unbiased.
//
// Both operands are K-contiguous (W [N, K] row-major is the MMA's row-major A; xb [m, K] row-major is its
// column-major B). Tiles of 64 K values (128 bytes) are staged with 16-byte cp.async into shared rows of 160
// bytes - the FP8 kernel's layout, 32 padding bytes per row - 3 or 4 stages deep. Rows past N, tokens past m
// and K past the end (K % 64 != 0; K is a multiple of 8, so a 16-byte chunk is all in or all out) are
// zero-filled by the copy without reading (src-size 0), never read out of bounds.
//
// Fragments. PTX's m16n8k16 16-bit layout (g = lane / 4, t = lane % 4): A register 0 holds row g, k = 2t,
// 2t + 1; register 1 row g + 8, same k; register 2 row g, k = 8 + 2t, 8 + 2t + 1; register 3 row g + 8, same
// k. B register 0 holds column g, k = 2t, 2t + 1; register 1 column g, k = 8 + 2t, 8 + 2t + 1. D: d0, d1 =
// row g, columns 2t, 2t + 1; d2, d3 = row g + 8, same columns. As in the FP8 kernel, a dot product does not
// care which k sits where as long as A and B agree: each lane loads 4 consecutive values k = 4t..4t+3 of its
// row (8 bytes, one 64-bit shared load) and gives k = 4t, 4t + 1 to the register the PTX table assigns
// k = 2t, 2t + 1 and k = 4t + 2, 4t + 3 to that of k = 8 + 2t, 8 + 2t + 1: the same permutation of the 16 k
// on both operands. The bytes a lane loads are those of the FP8 kernel (32 bytes per k step, 8 per lane).
// Bank check for those 64-bit loads (a half warp per phase: rows g = 0..3 or 4..7, 32 bytes each): with a row
// stride of 160 = 32 (mod 128) bytes the four rows start 0, 32, 64, 96 bytes apart modulo 128: disjoint banks.
// The cp.async writes: 8 consecutive lanes fill one 128-byte row: conflict-free with any row stride.
#include <algorithm>
#include <atomic>

#include "mma.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kRow = 160;      // shared bytes per staged row: 64 bf16 (128 bytes) + 32 padding
constexpr int kTileK = 64;     // K values per stage
constexpr int kMaxBT = 128;    // tokens per block at most (m up to 256: two token tiles)

// The shape of a block of BT tokens: warp grid, warp tile, stages, shared memory.
template <int BT>
struct Cfg {
  static constexpr int WM = BT >= 64 ? 4 : 8;  // warps along the 128 weight rows
  static constexpr int WN = 8 / WM;            // warps along the BT tokens
  static constexpr int MT = 128 / 16 / WM;     // m16 tiles per warp (1 or 2)
  static constexpr int NT = BT / 8 / WN;       // n8 tiles per warp
  static constexpr int kB = 128 * kRow;        // the token tile's offset in a stage
  static constexpr int kStage = (128 + BT) * kRow;  // a multiple of 128 (128 + BT is a multiple of 8)
  // BT <= 32: 4 stages, 87-100 KB (two blocks per SM); 64: 3 stages, 90 KB (two per SM); 128: 4 stages,
  // 160 KB (one per SM). Weight bytes in flight per SM: 96, 64 and 48 KB; ~22 KB per SM streams 4.2 TB/s at
  // ~700 ns of latency.
  static constexpr int kStages = BT == 64 ? 3 : 4;
  static constexpr int kMinBlocks = BT <= 64 ? 2 : 1;  // (two blocks per SM: at most 128 registers)
  static constexpr size_t kSmem = size_t(kStages) * kStage;
  static_assert(NT >= 1 && MT * WM * 16 == 128 && NT * WN * 8 == BT, "warp tiling");
};

// Stage kt (K values [64 kt, 64 kt + 64)) of the block's 128 weight rows (n0.., a_rows valid) and BT tokens
// (t0.., t_rows valid) into st.
template <int BT>
__device__ __forceinline__ void load_stage(unsigned char *st, const uint16_t *__restrict__ w, int a_rows,
                                           const uint16_t *__restrict__ x, int t_rows, int64_t K, int64_t kt) {
  const int tid = threadIdx.x;
  const int64_t k0 = kt * kTileK;
#pragma unroll
  for (int u = 0; u < 128 * 8 / kThreads; u++) {  // 128 rows x 8 chunks of 16 bytes (8 values)
    const int i = tid + u * kThreads, r = i >> 3, c = i & 7;
    const bool ok = r < a_rows && k0 + c * 8 < K;
    cp_async16(st + r * kRow + c * 16, ok ? w + int64_t(r) * K + k0 + c * 8 : w, ok);
  }
#pragma unroll
  for (int u = 0; u < (BT * 8 + kThreads - 1) / kThreads; u++) {
    const int i = tid + u * kThreads, j = i >> 3, c = i & 7;
    if (i < BT * 8) {
      const bool ok = j < t_rows && k0 + c * 8 < K;
      cp_async16(st + Cfg<BT>::kB + j * kRow + c * 16, ok ? x + int64_t(j) * K + k0 + c * 8 : x, ok);
    }
  }
}

// out[t, n] for t in the block's token tile (blockIdx.x), n in its 128 weight rows (blockIdx.y).
template <int BT>
__global__ void __launch_bounds__(kThreads, Cfg<BT>::kMinBlocks)
    gemm_bf16_kernel(const uint16_t *__restrict__ wb, int64_t N, int64_t K, const uint16_t *__restrict__ xb, int64_t m,
                     float *__restrict__ out, int64_t ld_out) {
  using C = Cfg<BT>;
  constexpr int MT = C::MT, NT = C::NT, STAGES = C::kStages;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t n0 = int64_t(blockIdx.y) * 128, t0 = int64_t(blockIdx.x) * BT;
  const uint16_t *w = wb + n0 * K, *x = xb + t0 * K;
  const int a_rows = int(min(int64_t(128), N - n0)), t_rows = int(min(int64_t(BT), m - t0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = (warp % C::WM) * MT * 16, tok0 = (warp / C::WM) * NT * 8;  // the warp's tile
  const int64_t nk = (K + kTileK - 1) / kTileK;

  float res[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int q = 0; q < 4; q++) res[mt][nt][q] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nk) load_stage<BT>(smem + s * C::kStage, w, a_rows, x, t_rows, K, s);
    cp_async_commit();  // (empty groups too: the wait count below stays uniform)
  }
  for (int64_t i = 0; i < nk; i++) {
    cp_async_wait<STAGES - 2>();  // stage i has landed (this thread's copies) ...
    __syncthreads();              // ... and everyone's; and everyone is done with stage i - 1's slot
    if (i + STAGES - 1 < nk)
      load_stage<BT>(smem + ((i + STAGES - 1) % STAGES) * C::kStage, w, a_rows, x, t_rows, K, i + STAGES - 1);
    cp_async_commit();
    const unsigned char *st = smem + (i % STAGES) * C::kStage;
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[mt][nt][q] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; kk++) {  // four k16 steps of 32 bytes per row
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const unsigned char *base = st + (row0 + mt * 16 + g) * kRow + kk * 32 + t * 8;
        const uint2 lo = *reinterpret_cast<const uint2 *>(base);             // row g: k = 4t..4t+3
        const uint2 hi = *reinterpret_cast<const uint2 *>(base + 8 * kRow);  // row g + 8
        a[mt][0] = lo.x;
        a[mt][1] = hi.x;
        a[mt][2] = lo.y;
        a[mt][3] = hi.y;
      }
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const uint2 b = *reinterpret_cast<const uint2 *>(st + C::kB + (tok0 + nt * 8 + g) * kRow + kk * 32 + t * 8);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) mma_bf16(acc[mt][nt], a[mt], b.x, b.y);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) res[mt][nt][q] += acc[mt][nt][q];
  }
  cp_async_wait<0>();  // (only empty groups are left)

#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const int j = tok0 + nt * 8 + 2 * t + (q & 1), r = row0 + mt * 16 + g + (q >> 1) * 8;
        if (j < t_rows && r < a_rows) out[(t0 + j) * ld_out + n0 + r] = res[mt][nt][q];
      }
}

template <int BT>
void launch(const uint16_t *xb, int64_t m, const DevMatrix &w, float *out, int64_t ld_out, cudaStream_t s) {
  static std::atomic<uint64_t> done{0};
  constexpr size_t smem = Cfg<BT>::kSmem;
  smem_opt_in(gemm_bf16_kernel<BT>, smem, done, "gemm_bf16_mma");
  const dim3 grid(unsigned((m + BT - 1) / BT), unsigned((w.rows + 127) / 128));
  gemm_bf16_kernel<BT><<<grid, kThreads, smem, s>>>(static_cast<const uint16_t *>(w.data), w.rows, w.cols, xb, m, out,
                                                    ld_out);
}

}  // namespace

int gemm_bf16_mma_tile(int64_t m) { return m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : kMaxBT; }

bool gemm_bf16_mma_supported(int64_t m, int64_t N, int64_t K) {
  return m >= 1 && m <= kGemmBf16MmaMaxRows && N >= 1 && (N + 127) / 128 <= 65535 && K >= 8 && K % 8 == 0;
}

// Half the SMs: a block keeps 48-96 KB of weight in flight, ~50-100 GB/s per SM at ~1 us of latency, so 66 of
// an H200's 132 SMs can still draw most of its 4.2 TB/s (a tensor-parallel rank's share of the lm_head, 16160
// rows of 8 ranks, is 127 blocks).
bool gemm_bf16_mma_fills_gpu(int64_t N) { return 2 * ((N + 127) / 128) >= sm_count(); }

void gemm_bf16_mma(const uint16_t *xb, int64_t m, const DevMatrix &w, float *out, int64_t ld_out, cudaStream_t s) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.dtype != kBF16 || !gemm_bf16_mma_supported(m, w.rows, w.cols))
    throw std::runtime_error("gemm_bf16_mma: BF16 weight, K % 8 == 0, 1 <= m <= 256 only");
  switch (gemm_bf16_mma_tile(m)) {
    case 8: launch<8>(xb, m, w, out, ld_out, s); break;
    case 16: launch<16>(xb, m, w, out, ld_out, s); break;
    case 32: launch<32>(xb, m, w, out, ld_out, s); break;
    case 64: launch<64>(xb, m, w, out, ld_out, s); break;
    default: launch<kMaxBT>(xb, m, w, out, ld_out, s); break;
  }
  check_launch("gemm_bf16_mma");
}

}  // namespace dsrt::kernels
