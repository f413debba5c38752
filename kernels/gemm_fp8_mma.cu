// Block-scaled FP8 GEMMs on tensor cores (mma.sync m16n8k32 e4m3) for decode batches and grouped MoE experts
// (spec §5.3): out[t, n] = sum over 128-wide K blocks kb of (sum_{k in kb} xq[t, k] wq[n, k]) * sx[t, kb] *
// sw[n / 128, kb].
//
// Swap-AB (DeepGEMM's trick for small M): the weight rows are the MMA's M side (16 per MMA) and the tokens its
// N side (8 per MMA), so a batch of 8 tokens fills the instruction instead of wasting 15/16 of it. A block owns
// 128 weight rows - exactly one row of weight scale blocks, so the weight scale of a K block is one scalar -
// and a tile of BT tokens (8, 16, 32 or 64). K is walked one 128-wide block at a time: the block's products are
// summed in a fresh fp32 accumulator and then added to the running result times sw * sx (promotion every 128
// K, as DeepSeek prescribes; the tensor core's own accumulation is not trusted over a long K).
//
// Both operands are K-contiguous (W [N, K] row-major is the MMA's row-major A; x [m, K] row-major is its
// column-major B). Tiles of 128 K bytes are staged with 16-byte cp.async into shared rows of 160 bytes (the
// 32 padding bytes make every fragment load conflict-free, below), 2-4 stages deep.
//
// Fragments. PTX's m16n8k32 8-bit layout (g = lane / 4, t = lane % 4): A register 0 holds row g, k = 4t..4t+3;
// register 1 row g + 8, same k; register 2 row g, k = 16 + 4t..+3; register 3 row g + 8, same k. B register 0
// holds column g, k = 4t..4t+3; register 1 column g, k = 16 + 4t..+3. D: d0, d1 = row g, columns 2t, 2t + 1;
// d2, d3 = row g + 8, same columns. A dot product does not care which k sits where as long as A and B agree,
// so each lane loads 8 consecutive bytes k = 8t..8t+7 of its row (one 64-bit shared load) and gives bytes 0-3
// to the registers the PTX table assigns k = 4t..4t+3 and bytes 4-7 to those of k = 16 + 4t..+3: the same
// permutation of k on both operands, so the sum is unchanged and each operand costs half the loads.
// Bank check for those 64-bit loads (a half warp per phase: rows g = 0..3 or 4..7, 32 bytes each): with a row
// stride of 160 = 32 (mod 128) bytes the four rows start 0, 32, 64, 96 bytes apart modulo 128: disjoint banks.
//
// Grouped MoE (no host sync): a sort kernel groups the T*K (token, slot) pairs by expert and writes a table of
// tiles (expert, first sorted pair, rows); the gate+up kernel runs every tile of every expert in one launch
// (a grid sized by the upper bound ceil(T*K / BT) + E tiles; blocks past the real count exit), loading each
// tile's token rows through the sorted pair -> token index, applying SwiGLU and quantising h per 128 channels
// (a block holds all 128 channels of one group for its tokens) in its epilogue; the down kernel writes one
// fp32 row per pair; a combine kernel adds each token's pairs in ascending expert order (the CPU's order).
#include <algorithm>
#include <atomic>

#include "mma.cuh"

namespace dsrt::kernels {

namespace {

constexpr int kThreads = 256;  // 8 warps; warp w owns weight rows 16w .. 16w + 15 of the block's 128
constexpr int kRow = 160;      // shared bytes per staged row: 128 K bytes + 32 padding
constexpr int kMatBytes = 128 * kRow;
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 32;

// d += a (16 x 32 e4m3, row) * b (32 x 8 e4m3, col), fp32 accumulate.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared memory of one pipeline stage: NA weight tiles [128][kRow], the token tile [BT][kRow], the tokens'
// scales of this K block [BT] and the NA weight scales.
template <int NA, int BT>
struct Stage {
  static constexpr int kB = NA * kMatBytes;
  static constexpr int kSx = kB + BT * kRow;
  static constexpr int kSw = kSx + BT * 4;
  static constexpr int kBytes = (kSw + NA * 4 + 127) / 128 * 128;
};

// What a block multiplies: NA weight tiles of 128 rows (rows >= a_rows are zeros), each with its row of block
// scales, against BT token rows whose bytes and scales the block found (b_row[j] == nullptr: a zero row).
template <int NA, int BT>
struct Operands {
  const uint8_t *a[NA];      // row n0 of each weight matrix (row stride K)
  const float *a_scale[NA];  // its block-scale row: a_scale[kb]
  int a_rows;                // valid rows of the 128
  int64_t K;
  const uint8_t *const *b_row;  // [BT] (shared) token row j, K bytes
  const float *const *b_scale;  // [BT] (shared) token row j's scale of block kb: b_scale[j][kb * b_scale_kb]
  int64_t b_scale_kb;
};

template <int NA, int BT>
__device__ __forceinline__ void load_stage(unsigned char *st, const Operands<NA, BT> &op, int64_t kb) {
  using S = Stage<NA, BT>;
  const int tid = threadIdx.x;
  const int64_t k0 = kb * 128;
#pragma unroll
  for (int mat = 0; mat < NA; mat++)  // (unrolled: op.a[mat] stays in registers)
#pragma unroll
    for (int u = 0; u < 1024 / kThreads; u++) {  // 128 rows x 8 chunks of 16 bytes per weight tile
      const int i = tid + u * kThreads, r = i >> 3, c = i & 7;
      const bool ok = r < op.a_rows;
      const uint8_t *src = op.a[mat] + (ok ? int64_t(r) * op.K + k0 + c * 16 : 0);
      cp_async16(st + mat * kMatBytes + r * kRow + c * 16, src, ok);
    }
  for (int i = tid; i < BT * 8; i += kThreads) {
    const int j = i >> 3, c = i & 7;
    const uint8_t *row = op.b_row[j];
    cp_async16(st + S::kB + j * kRow + c * 16, row ? row + k0 + c * 16 : op.a[0], row != nullptr);
  }
  if (tid < BT) {
    const float *sc = op.b_scale[tid];
    const bool ok = op.b_row[tid] != nullptr;
    cp_async4(st + S::kSx + tid * 4, ok ? sc + kb * op.b_scale_kb : op.a_scale[0], ok);
  }
#pragma unroll
  for (int mat = 0; mat < NA; mat++)
    if (tid == BT + mat) cp_async4(st + S::kSw + mat * 4, op.a_scale[mat] + kb, true);
}

// res[mat][nt] (the D fragments of warp rows 16w.., tokens 8nt..) += the scaled products of K blocks
// [kb0, kb1). Every thread of the block takes part (cp.async and barriers).
template <int NA, int BT, int STAGES>
__device__ __forceinline__ void mainloop(unsigned char *smem, const Operands<NA, BT> &op, int64_t kb0, int64_t kb1,
                                         float (&res)[NA][BT / 8][4]) {
  using S = Stage<NA, BT>;
  constexpr int NT = BT / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t nk = kb1 - kb0;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nk) load_stage(smem + s * S::kBytes, op, kb0 + s);
    cp_async_commit();  // (empty groups too: the wait count below stays uniform)
  }
  for (int64_t i = 0; i < nk; i++) {
    cp_async_wait<STAGES - 2>();  // stage i has landed (this thread's copies) ...
    __syncthreads();              // ... and everyone's; and everyone is done with stage i - 1's slot
    if (i + STAGES - 1 < nk) load_stage(smem + ((i + STAGES - 1) % STAGES) * S::kBytes, op, kb0 + i + STAGES - 1);
    cp_async_commit();
    const unsigned char *st = smem + (i % STAGES) * S::kBytes;
    float acc[NA][NT][4];
#pragma unroll
    for (int mat = 0; mat < NA; mat++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[mat][nt][q] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {  // four k32 steps per 128-wide block
      uint32_t a[NA][4];
#pragma unroll
      for (int mat = 0; mat < NA; mat++) {
        const unsigned char *base = st + mat * kMatBytes + (warp * 16 + g) * kRow + kk * 32 + t * 8;
        const uint2 lo = *reinterpret_cast<const uint2 *>(base);             // row g
        const uint2 hi = *reinterpret_cast<const uint2 *>(base + 8 * kRow);  // row g + 8
        a[mat][0] = lo.x;
        a[mat][1] = hi.x;
        a[mat][2] = lo.y;
        a[mat][3] = hi.y;
      }
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const uint2 b = *reinterpret_cast<const uint2 *>(st + S::kB + (nt * 8 + g) * kRow + kk * 32 + t * 8);
#pragma unroll
        for (int mat = 0; mat < NA; mat++) mma_e4m3(acc[mat][nt], a[mat], b.x, b.y);
      }
    }
    const float *sx = reinterpret_cast<const float *>(st + S::kSx);
    const float *sw = reinterpret_cast<const float *>(st + S::kSw);
#pragma unroll
    for (int mat = 0; mat < NA; mat++)
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        const float s0 = sw[mat] * sx[nt * 8 + 2 * t], s1 = sw[mat] * sx[nt * 8 + 2 * t + 1];
        res[mat][nt][0] += acc[mat][nt][0] * s0;
        res[mat][nt][1] += acc[mat][nt][1] * s1;
        res[mat][nt][2] += acc[mat][nt][2] * s0;
        res[mat][nt][3] += acc[mat][nt][3] * s1;
      }
  }
  cp_async_wait<0>();
  __syncthreads();  // the caller may reuse the shared memory
}

// A kernel's shared memory: the pipeline stages (<= ~100 KB per block, so two blocks fit an SM), then the
// tables of the tile's token rows (BT row pointers, BT scale pointers, BT int32).
template <int NA, int BT>
struct Smem {
  static constexpr int kStages = NA == 2 ? 2 : BT <= 32 ? 4 : 3;
  static constexpr size_t kTables = size_t(kStages) * Stage<NA, BT>::kBytes;
  static constexpr size_t kTotal = kTables + size_t(BT) * 2 * sizeof(void *) + size_t(BT) * sizeof(int32_t);
};

// ---- the plain GEMM: out[t, n] for t < m (or, split, partial[z][t][n] for K blocks of split z)
template <int BT>
__global__ void __launch_bounds__(kThreads) gemm_kernel(DevMatrix w, const uint8_t *__restrict__ xq,
                                                       const float *__restrict__ xs, int64_t ld_s, int64_t m,
                                                       float *__restrict__ out, int64_t ld_out,
                                                       float *__restrict__ partial, int kb_per_split) {
  extern __shared__ __align__(128) unsigned char smem[];
  const uint8_t **b_row = reinterpret_cast<const uint8_t **>(smem + Smem<1, BT>::kTables);
  const float **b_scale = reinterpret_cast<const float **>(b_row + BT);
  const int64_t N = w.rows, K = w.cols, nb = blockIdx.x, t0 = int64_t(blockIdx.y) * BT;
  const int64_t kb0 = int64_t(blockIdx.z) * kb_per_split, kb1 = min(K / 128, kb0 + kb_per_split);
  if (threadIdx.x < BT) {
    const int64_t tok = t0 + threadIdx.x;
    b_row[threadIdx.x] = tok < m ? xq + tok * K : nullptr;
    b_scale[threadIdx.x] = xs + (tok < m ? tok : 0);  // M-major: block kb at + kb * ld_s
  }
  __syncthreads();
  Operands<1, BT> op;
  op.a[0] = static_cast<const uint8_t *>(w.data) + nb * 128 * K;
  op.a_scale[0] = w.scale + nb * w.scale_cols;
  op.a_rows = int(min(int64_t(128), N - nb * 128));
  op.K = K;
  op.b_row = b_row;
  op.b_scale = b_scale;
  op.b_scale_kb = ld_s;
  float res[1][BT / 8][4] = {};
  mainloop<1, BT, Smem<1, BT>::kStages>(smem, op, kb0, kb1, res);
  float *dst = partial ? partial + int64_t(blockIdx.z) * m * N : out;
  const int64_t ld = partial ? N : ld_out;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < BT / 8; nt++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const int64_t tok = t0 + nt * 8 + 2 * t + (q & 1), n = nb * 128 + warp * 16 + g + (q >> 1) * 8;
      if (tok < m && n < N) dst[tok * ld + n] = res[0][nt][q];
    }
}

// out[t, n] = sum of the splits' partials in split order (deterministic; no float atomics).
__global__ void split_sum_kernel(const float *__restrict__ partial, int splits, int64_t m, int64_t N,
                                 float *__restrict__ out, int64_t ld_out) {
  const int64_t total = m * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; z++) s += partial[z * total + i];
    out[(i / N) * ld_out + i % N] = s;
  }
}

template <int BT>
void launch_gemm(const uint8_t *xq, const float *xs, int64_t ld_s, int64_t m, const DevMatrix &w, float *out,
                 int64_t ld_out, float *partial, const GemmFp8Plan &p, cudaStream_t s) {
  static std::atomic<uint64_t> done{0};
  constexpr size_t smem = Smem<1, BT>::kTotal;
  smem_opt_in(gemm_kernel<BT>, smem, done, "gemm_fp8_mma");
  const dim3 grid(unsigned((w.rows + 127) / 128), unsigned(p.token_tiles), unsigned(p.splits));
  gemm_kernel<BT><<<grid, kThreads, smem, s>>>(w, xq, xs, ld_s, m, out, ld_out, p.splits > 1 ? partial : nullptr,
                                               p.kb_per_split);
}

// ---- grouped MoE

struct MoeTile {
  int32_t expert, first, rows, pad;
};

// One block: counts per expert, exclusive scan, the tile table, then the scatter of pair ids into expert
// order. Within an expert the order depends on atomics; nothing downstream depends on it (each pair's rows
// are computed independently and combined by pair id). Ids outside [0, E) are dropped (their rows stay
// unwritten and the combine skips them).
__global__ void __launch_bounds__(1024) moe_sort_kernel(const int32_t *__restrict__ ids, int64_t n_pairs, int E, int BT,
                                                       int32_t *__restrict__ sorted, MoeTile *__restrict__ tiles,
                                                       int32_t *__restrict__ n_tiles) {
  __shared__ int32_t count[kMaxExperts], start[kMaxExperts], cursor[kMaxExperts], tile0[kMaxExperts];
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const int32_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t pos = 0, tl = 0;
    for (int e = 0; e < E; e++) {
      start[e] = cursor[e] = pos;
      tile0[e] = tl;
      pos += count[e];
      tl += (count[e] + BT - 1) / BT;
    }
    *n_tiles = tl;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    for (int32_t j = 0; j * BT < count[e]; j++)
      tiles[tile0[e] + j] = MoeTile{e, start[e] + j * BT, min(BT, count[e] - j * BT), 0};
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const int32_t e = ids[i];
    if (e >= 0 && e < E) sorted[atomicAdd(&cursor[e], 1)] = int32_t(i);
  }
}

// Gate and up of one tile for 128 intermediate columns (block (tile, nb)), then h = silu(g) * u quantised per
// token over these 128 channels (s = amax / 448, e4m3(h / s): quantize_rows_fp8's rule) into hq [pos, I]
// (pos: the pair's place in expert order) and hs [pos, I / 128].
template <int BT>
__global__ void __launch_bounds__(kThreads) moe_gate_up_kernel(const uint8_t *__restrict__ xq,
                                                              const float *__restrict__ xs, int64_t T, int64_t H,
                                                              int64_t I, int64_t K, const int32_t *__restrict__ sorted,
                                                              const MoeTile *__restrict__ tiles,
                                                              const int32_t *__restrict__ n_tiles,
                                                              const DevMatrix *__restrict__ gate,
                                                              const DevMatrix *__restrict__ up, uint8_t *__restrict__ hq,
                                                              float *__restrict__ hs) {
  extern __shared__ __align__(128) unsigned char smem[];
  if (int32_t(blockIdx.x) >= *n_tiles) return;
  const uint8_t **b_row = reinterpret_cast<const uint8_t **>(smem + Smem<2, BT>::kTables);
  const float **b_scale = reinterpret_cast<const float **>(b_row + BT);
  const MoeTile tl = tiles[blockIdx.x];
  const int64_t nb = blockIdx.y;
  if (threadIdx.x < BT) {
    const bool ok = int(threadIdx.x) < tl.rows;
    const int64_t tok = ok ? sorted[tl.first + threadIdx.x] / K : 0;
    b_row[threadIdx.x] = ok ? xq + tok * H : nullptr;
    b_scale[threadIdx.x] = xs + tok;  // M-major [H / 128][T]
  }
  __syncthreads();
  const DevMatrix &wg = gate[tl.expert], &wu = up[tl.expert];
  Operands<2, BT> op;
  op.a[0] = static_cast<const uint8_t *>(wg.data) + nb * 128 * H;
  op.a[1] = static_cast<const uint8_t *>(wu.data) + nb * 128 * H;
  op.a_scale[0] = wg.scale + nb * wg.scale_cols;
  op.a_scale[1] = wu.scale + nb * wu.scale_cols;
  op.a_rows = 128;  // I is a multiple of 128
  op.K = H;
  op.b_row = b_row;
  op.b_scale = b_scale;
  op.b_scale_kb = T;
  float res[2][BT / 8][4] = {};
  mainloop<2, BT, Smem<2, BT>::kStages>(smem, op, 0, H / 128, res);

  // Epilogue: the pipeline's shared memory is free again (mainloop ends with a barrier).
  constexpr int NT = BT / 8;
  constexpr int kQRow = 128 + 16;  // staged e4m3 bytes per token row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  float *red = reinterpret_cast<float *>(smem);                     // [8 warps][BT] partial maxima
  float *scale = red + 8 * BT;                                      // [BT]
  unsigned char *qt = smem + (8 * BT + BT) * sizeof(float);         // [BT][kQRow]
  float h[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const float gv = res[0][nt][q], uv = res[1][nt][q];
      h[nt][q] = gv / (1.0f + expf(-gv)) * uv;
    }
  // amax per token column over the block's 128 rows: rows g, g + 8 in a lane, g across lanes (xor 4, 8, 16),
  // then the 8 warps through shared memory.
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int c = 0; c < 2; c++) {
      float v = fmaxf(fabsf(h[nt][c]), fabsf(h[nt][2 + c]));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
      if (g == 0) red[warp * BT + nt * 8 + 2 * t + c] = v;
    }
  __syncthreads();
  if (threadIdx.x < BT) {
    float amax = 0.0f;
    for (int w = 0; w < 8; w++) amax = fmaxf(amax, red[w * BT + threadIdx.x]);
    scale[threadIdx.x] = amax > 0.0f ? amax / 448.0f : 1.0f;
  }
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const int j = nt * 8 + 2 * t + (q & 1), r = warp * 16 + g + (q >> 1) * 8;
      qt[j * kQRow + r] = __nv_cvt_float_to_fp8(h[nt][q] / scale[j], __NV_SATFINITE, __NV_E4M3);
    }
  __syncthreads();
  for (int i = threadIdx.x; i < tl.rows * 8; i += kThreads) {  // 16-byte stores of each valid row's 128 bytes
    const int j = i >> 3, c = i & 7;
    const int64_t pos = tl.first + j;
    *reinterpret_cast<uint4 *>(hq + pos * I + nb * 128 + c * 16) = *reinterpret_cast<const uint4 *>(qt + j * kQRow + c * 16);
  }
  if (int(threadIdx.x) < tl.rows) hs[(tl.first + threadIdx.x) * (I / 128) + nb] = scale[threadIdx.x];
}

// Down projection of one tile for 128 output columns: y[pair, n] (pair = the original t * K + k).
template <int BT>
__global__ void __launch_bounds__(kThreads) moe_down_kernel(const uint8_t *__restrict__ hq, const float *__restrict__ hs,
                                                           int64_t H, int64_t I, const int32_t *__restrict__ sorted,
                                                           const MoeTile *__restrict__ tiles,
                                                           const int32_t *__restrict__ n_tiles,
                                                           const DevMatrix *__restrict__ down, float *__restrict__ y) {
  extern __shared__ __align__(128) unsigned char smem[];
  if (int32_t(blockIdx.x) >= *n_tiles) return;
  const uint8_t **b_row = reinterpret_cast<const uint8_t **>(smem + Smem<1, BT>::kTables);
  const float **b_scale = reinterpret_cast<const float **>(b_row + BT);
  int32_t *pair = reinterpret_cast<int32_t *>(b_scale + BT);
  const MoeTile tl = tiles[blockIdx.x];
  const int64_t nb = blockIdx.y;
  if (threadIdx.x < BT) {
    const bool ok = int(threadIdx.x) < tl.rows;
    const int64_t pos = tl.first + (ok ? threadIdx.x : 0);
    b_row[threadIdx.x] = ok ? hq + pos * I : nullptr;
    b_scale[threadIdx.x] = hs + pos * (I / 128);  // row-major: block kb at + kb
    pair[threadIdx.x] = ok ? sorted[pos] : -1;
  }
  __syncthreads();
  const DevMatrix &wd = down[tl.expert];
  Operands<1, BT> op;
  op.a[0] = static_cast<const uint8_t *>(wd.data) + nb * 128 * I;
  op.a_scale[0] = wd.scale + nb * wd.scale_cols;
  op.a_rows = int(min(int64_t(128), H - nb * 128));
  op.K = I;
  op.b_row = b_row;
  op.b_scale = b_scale;
  op.b_scale_kb = 1;
  float res[1][BT / 8][4] = {};
  mainloop<1, BT, Smem<1, BT>::kStages>(smem, op, 0, I / 128, res);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < BT / 8; nt++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const int j = nt * 8 + 2 * t + (q & 1);
      const int64_t n = nb * 128 + warp * 16 + g + (q >> 1) * 8;
      if (j < tl.rows && n < H) y[int64_t(pair[j]) * H + n] = res[0][nt][q];
    }
}

// out[t, n] = sum over the token's K pairs in ascending expert id (ties: slot order) of w * y[pair, n]: the
// order the CPU reference adds experts in. One block per token.
__global__ void moe_combine_kernel(const float *__restrict__ y, const int32_t *__restrict__ ids,
                                   const float *__restrict__ w, int64_t H, int64_t K, int E, float *__restrict__ out) {
  __shared__ int32_t order[kMaxTopK];
  __shared__ int n_valid;
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int k = 0; k < K; k++) {  // insertion by (id, slot); K <= 32
      const int32_t e = ids[t * K + k];
      if (e < 0 || e >= E) continue;
      int i = n++;
      while (i > 0 && ids[t * K + order[i - 1]] > e) {
        order[i] = order[i - 1];
        i--;
      }
      order[i] = k;
    }
    n_valid = n;
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < H; n += blockDim.x) {
    float s = 0.0f;
    for (int i = 0; i < n_valid; i++) {
      const int64_t p = t * K + order[i];
      s += w[p] * y[p * H + n];
    }
    out[t * H + n] = s;
  }
}

template <int BT>
void launch_moe(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                int64_t E, const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, const MoeGroupedLayout &L,
                unsigned char *scratch, float *out, cudaStream_t s) {
  uint8_t *xq = scratch + L.xq;
  float *xs = reinterpret_cast<float *>(scratch + L.xs);
  int32_t *sorted = reinterpret_cast<int32_t *>(scratch + L.sorted);
  MoeTile *tiles = reinterpret_cast<MoeTile *>(scratch + L.tiles);
  int32_t *n_tiles = reinterpret_cast<int32_t *>(scratch + L.n_tiles);
  uint8_t *hq = scratch + L.hq;
  float *hs = reinterpret_cast<float *>(scratch + L.hs);
  float *y = reinterpret_cast<float *>(scratch + L.y);
  quantize_rows_fp8(x, T, H, T, xq, xs, s);
  moe_sort_kernel<<<1, 1024, 0, s>>>(ids, T * K, int(E), BT, sorted, tiles, n_tiles);
  check_launch("moe_sort");
  {
    static std::atomic<uint64_t> done{0};
    constexpr size_t smem = Smem<2, BT>::kTotal;
    smem_opt_in(moe_gate_up_kernel<BT>, smem, done, "gemm_fp8_mma");
    moe_gate_up_kernel<BT><<<dim3(unsigned(L.max_tiles), unsigned(I / 128)), kThreads, smem, s>>>(
        xq, xs, T, H, I, K, sorted, tiles, n_tiles, gate, up, hq, hs);
    check_launch("moe_gate_up (mma)");
  }
  {
    static std::atomic<uint64_t> done{0};
    constexpr size_t smem = Smem<1, BT>::kTotal;
    smem_opt_in(moe_down_kernel<BT>, smem, done, "gemm_fp8_mma");
    moe_down_kernel<BT><<<dim3(unsigned(L.max_tiles), unsigned((H + 127) / 128)), kThreads, smem, s>>>(
        hq, hs, H, I, sorted, tiles, n_tiles, down, y);
    check_launch("moe_down (mma)");
  }
  moe_combine_kernel<<<unsigned(T), 256, 0, s>>>(y, ids, w, H, K, int(E), out);
  check_launch("moe_combine");
}

int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

}  // namespace

GemmFp8Plan gemm_fp8_mma_plan(int64_t m, int64_t N, int64_t K, int k_split) {
  GemmFp8Plan p;
  p.tile = m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : 64;
  p.token_tiles = (m + p.tile - 1) / p.tile;
  const int64_t nkb = K / 128, blocks = (N + 127) / 128 * p.token_tiles;
  int64_t want = k_split;
  if (want <= 0) {  // auto: split K until there are ~2 blocks per SM (but keep >= 2 K blocks per split)
    const int64_t target = 2 * int64_t(sm_count());
    want = blocks >= target ? 1 : std::min<int64_t>((target + blocks - 1) / blocks, std::max<int64_t>(1, nkb / 2));
  }
  want = std::max<int64_t>(1, std::min<int64_t>(want, nkb));
  p.kb_per_split = int((nkb + want - 1) / want);
  p.splits = int((nkb + p.kb_per_split - 1) / p.kb_per_split);  // no empty split
  return p;
}

int64_t gemm_fp8_mma_workspace_floats(int64_t m, int64_t N, int64_t K, int k_split) {
  const GemmFp8Plan p = gemm_fp8_mma_plan(m, N, K, k_split);
  return p.splits > 1 ? int64_t(p.splits) * m * N : 0;
}

void gemm_fp8_mma(const uint8_t *xq, const float *xs, int64_t ld_s, int64_t m, const DevMatrix &w, float *out,
                  int64_t ld_out, float *workspace, int k_split, cudaStream_t s) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.dtype != kFP8 || w.cols % 128 || w.cols <= 0) throw std::runtime_error("gemm_fp8_mma: FP8 weight with K % 128 == 0 only");
  const GemmFp8Plan p = gemm_fp8_mma_plan(m, w.rows, w.cols, k_split);
  if (p.splits > 1 && !workspace) throw std::runtime_error("gemm_fp8_mma: split K needs a workspace");
  switch (p.tile) {
    case 8: launch_gemm<8>(xq, xs, ld_s, m, w, out, ld_out, workspace, p, s); break;
    case 16: launch_gemm<16>(xq, xs, ld_s, m, w, out, ld_out, workspace, p, s); break;
    case 32: launch_gemm<32>(xq, xs, ld_s, m, w, out, ld_out, workspace, p, s); break;
    default: launch_gemm<64>(xq, xs, ld_s, m, w, out, ld_out, workspace, p, s); break;
  }
  check_launch("gemm_fp8_mma");
  if (p.splits > 1) {
    const int64_t n = m * w.rows;
    split_sum_kernel<<<unsigned(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, s>>>(workspace, p.splits, m, w.rows,
                                                                                      out, ld_out);
    check_launch("gemm_fp8_mma split sum");
  }
}

MoeGroupedLayout moe_grouped_layout(int64_t T, int64_t K, int64_t E, int64_t H, int64_t I) {
  MoeGroupedLayout L;
  const int64_t pairs = T * K, avg = (pairs + E - 1) / std::max<int64_t>(E, 1);
  L.tile = avg <= 8 ? 8 : avg <= 16 ? 16 : 32;
  L.max_tiles = (pairs + L.tile - 1) / L.tile + E;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += align256(std::max<int64_t>(bytes, 1));
    return at;
  };
  L.xq = take(T * H);
  L.xs = take(H / 128 * T * 4);
  L.sorted = take(pairs * 4);
  L.tiles = take(L.max_tiles * int64_t(sizeof(MoeTile)));
  L.n_tiles = take(4);
  L.hq = take(pairs * I);
  L.hs = take(pairs * (I / 128) * 4);
  L.y = take(pairs * H * 4);
  L.bytes = off;
  return L;
}

bool moe_grouped_supported(int64_t H, int64_t I, int64_t K, int64_t E) {
  return H > 0 && I > 0 && H % 128 == 0 && I % 128 == 0 && K >= 1 && K <= kMaxTopK && E >= 1 && E <= kMaxExperts;
}

void moe_experts_grouped(const float *x, int64_t T, int64_t H, int64_t I, const int32_t *ids, const float *w, int64_t K,
                         int64_t E, const DevMatrix *gate, const DevMatrix *up, const DevMatrix *down, void *scratch,
                         float *out, cudaStream_t s) {
  if (T == 0) return;
  if (!moe_grouped_supported(H, I, K, E))
    throw std::runtime_error("moe_experts_grouped: H and I must be multiples of 128, K <= 32, E <= 1024");
  const MoeGroupedLayout L = moe_grouped_layout(T, K, E, H, I);
  unsigned char *sc = static_cast<unsigned char *>(scratch);
  switch (L.tile) {
    case 8: launch_moe<8>(x, T, H, I, ids, w, K, E, gate, up, down, L, sc, out, s); break;
    case 16: launch_moe<16>(x, T, H, I, ids, w, K, E, gate, up, down, L, sc, out, s); break;
    default: launch_moe<32>(x, T, H, I, ids, w, K, E, gate, up, down, L, sc, out, s); break;
  }
}

}  // namespace dsrt::kernels
