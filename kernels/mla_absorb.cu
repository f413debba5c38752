// The two absorption products of MLA's absorbed form (spec §3.9), per head h of nh, over `rows` query rows:
//   q_absorb:   qcat[r, h, c]  = sum_d q_nope[r, h, d] W[h*(dn+dv) + d, c]        ([rows x dn] x [dn x dc])
//               qcat[r, h, dc + k] = q_pe[r, h, k]                                   (copied)
//   out_absorb: out[r, h*dv + v] = sum_c olat[r, h, c] W[h*(dn+dv) + dn + v, c]   ([rows x dc] x [dc x dv]^T)
// with W = kv_b [nh*(dn+dv), dc] (FP8 e4m3 with 128x128 block scales, BF16, or fp32/F16 on the fallback).
//
// Two implementations. The fp32 CUDA-core kernels (q_absorb_kernel, q_absorb_row_kernel, out_absorb_kernel)
// take one query row (decode at batch 1: a weight-bandwidth-bound GEMV) and the shapes the tensor-core kernels
// do not cover. Two rows or more go to the tensor-core kernels (q_absorb_tc_kernel, out_absorb_tc_kernel): at
// decode batch 32 / 128 on V3's shapes the CUDA-core products took 0.55 / 2.16 ms per two-layer step (issue 10).
//
// Tensor-core kernels: mma.sync m16n8k16, bf16 operands, fp32 accumulation, batched over heads: block
// (column tile, head, row tile) computes BM = 16*MT rows (MT = 1, 2, 4 by the row count) x 64 output columns
// of one head; 4 warps, warp w owns output columns 16w .. 16w + 15 (two n8 tiles) for all BM rows. The query
// rows are the MMA's M side and the weights its N side. K (dn for q_absorb, dc for out_absorb) is walked in
// chunks of 64: the block stages the chunk's activations and weights in shared memory (plain loads, converted
// on the way), __syncthreads, four k16 steps of MMAs, __syncthreads, next chunk. No pipelining: several blocks
// per SM (4 to 10 by registers, 48-128 per thread; 14-28 KB of static shared memory) overlap one block's
// loads with another's MMAs. The column tiles are the grid's fastest dimension, so the blocks that read the same
// activation rows run together and share them through L2; each product's weights (8 MB in FP8 on V3) are
// read once per row tile, from L2 after the first.
//
// Numerics stay near fp32 (the CPU reference is fp32). Weights: e4m3 -> half -> float -> bf16 is exact (3
// mantissa bits, exponents well inside bf16's), BF16 weights are used as they are. Activations: each fp32 x is
// split into hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in fp32), and every weight fragment is
// multiplied by both (two MMAs into the same accumulator): x = hi + lo to ~2^-17 relative, as mla_flash.cu
// does for its query. FP8 block scales are applied exactly as the math has them, on fp32 sums: the products of
// consecutive k16 steps that share one scale are summed in a fresh accumulator `part`, which is added to the
// result times that scale when the scale changes (and at the end). q_absorb's K index d is a row of W: the
// scale block is ((h*(dn+dv) + d) / 128, c / 128), and the row block may change inside a head (dn + dv not a
// multiple of 128); a k16 step never straddles two row blocks because dn + dv is a multiple of 16 (required for
// FP8). out_absorb's K index c is a column: the scale is ((h*(dn+dv) + dn + v) / 128, c / 128), changing every
// 128 c; an n8 tile of v never straddles two row blocks because h*(dn+dv) + dn is a multiple of 8 (required).
// BF16 weights have scale 1 (one flush at the end).
//
// Bounds: rows past `rows`, columns past dc (q) or dv (out) and K past dn (q) or dc (out) are staged as zeros
// (never read); k16 steps wholly past K are skipped (their scale index could lie past the scale row); only
// valid outputs are written. Requirements (else the fallback): dc % 4 == 0 (4-element weight loads), kv_b.data
// 16-byte aligned; FP8: (dn + dv) % 16 == 0 for q_absorb, (dn + dv) % 8 == 0 and dn % 8 == 0 for out_absorb.
//
// Fragments (PTX m16n8k16 .bf16; g = lane / 4, t = lane % 4; a register holds two bf16, the lower k in its
// low 16 bits): A (16x16, row-major) a0 = row g, k 2t..2t+1; a1 = row g + 8, same k; a2 = row g, k 2t+8..+9;
// a3 = row g + 8, k 2t+8..+9. B (16x8, "col-major": a column's consecutive k packed) b0 = k 2t..2t+1,
// column g; b1 = k 2t+8..+9, column g. D: d0, d1 = row g, columns 2t, 2t + 1; d2, d3 = row g + 8, same columns.
// Shared layouts:
//   activations (both kernels): hi and lo as 32-bit words [BM][36], word p of a row = k 2p, 2p+1 of the chunk
//     (32 words + 4 padding). a0 = word (16i + g) * 36 + 8s + t (k16 step s): banks 4g + t, conflict-free.
//   out_absorb's weights: words [64 columns v][36], the same packing along c (W's rows are c-contiguous, so a
//     staged row is a B column): b0 = word (n * 36 + 8s + t), b1 = +4; conflict-free likewise.
//   q_absorb's weights: W's rows are K (d) with the columns c contiguous, so a B register's two k are a row
//     apart. Staged as bf16 [64 k][72] (c contiguous, 8 padding) and each B register assembled from two 16-bit
//     loads: b0 = (Ws[16s + 2t][n], Ws[16s + 2t + 1][n]) with n = 16w + 8j + g. A row is 144 bytes, so rows 2t
//     (t = 0..3) start 0, 32, 64, 96 bytes apart modulo 128 and lanes g read within 16 bytes: no conflicts.
#include <algorithm>
#include <cstdint>

#include "gemv.cuh"
#include "mma.cuh"

namespace dsrt::kernels {

namespace {

// ---- fp32 CUDA-core kernels

// q_lat[r, h, c] = sum_d q_nope[r, h, d] W_UK[h][d, c], and q_pe copied after it: qcat [rows, nh, dc + dr].
// Grid (ceil(dc/128), nh, ceil(rows/MT)), 8 warps: lane owns 4 columns, warp w sums rows d = w, w+8, ...;
// each weight is read once for MT query rows.
template <int MT>
__global__ void __launch_bounds__(256) q_absorb_kernel(const float *q, int64_t qs, int64_t rows, DevMatrix kv_b,
                                                      int64_t nh, int64_t dn, int64_t dr, int64_t dv, float *qcat) {
  __shared__ float part[8][128];
  const int64_t dc = kv_b.cols, h = blockIdx.y, r0 = int64_t(blockIdx.z) * MT, kvw = dn + dv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c0 = int64_t(blockIdx.x) * 128 + lane * 4;
  const int nr = rows - r0 < MT ? int(rows - r0) : MT;
  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; t++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[t][j] = 0.0f;
  const bool fp8_fast = kv_b.dtype == kFP8 && dc % 4 == 0;
#pragma unroll 4  // four weight loads in flight per lane
  for (int64_t d = warp; d < dn && c0 < dc; d += 8) {
    const int64_t row = h * kvw + d;
    float wv[4];
    if (fp8_fast) {  // 4 bytes, one scale (4 | 128)
      const uint32_t w4 = __ldg(reinterpret_cast<const uint32_t *>(static_cast<const uint8_t *>(kv_b.data) + row * dc + c0));
      const float sc = kv_b.scale[(row / 128) * kv_b.scale_cols + c0 / 128];
      const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w4 & 0xffff), __NV_E4M3);
      const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w4 >> 16), __NV_E4M3);
      const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
      wv[0] = a.x * sc;
      wv[1] = a.y * sc;
      wv[2] = b.x * sc;
      wv[3] = b.y * sc;
    } else {
#pragma unroll
      for (int j = 0; j < 4; j++) wv[j] = c0 + j < dc ? load_w(kv_b, row, c0 + j) : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
      if (t < nr) {
        const float qv = q[(r0 + t) * qs + h * (dn + dr) + d];
#pragma unroll
        for (int j = 0; j < 4; j++) acc[t][j] += qv * wv[j];
      }
  }
  for (int t = 0; t < nr; t++) {
#pragma unroll
    for (int j = 0; j < 4; j++) part[warp][lane * 4 + j] = acc[t][j];
    __syncthreads();
    float *out = qcat + ((r0 + t) * nh + h) * (dc + dr);
    if (threadIdx.x < 128) {
      const int64_t c = int64_t(blockIdx.x) * 128 + threadIdx.x;
      if (c < dc) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; w++) v += part[w][threadIdx.x];
        out[c] = v;
      }
    }
    if (blockIdx.x == 0)
      for (int64_t k = threadIdx.x; k < dr; k += blockDim.x) out[dc + k] = q[(r0 + t) * qs + h * (dn + dr) + dn + k];
    __syncthreads();
  }
}

// The same product for one query row (decode): a block per head, a lane owns 16 columns (one 16-byte FP8
// load per weight row: the 4-byte loads above left the decode launch latency-bound at ~25 us).
constexpr int kAbsorbMaxDc = 512;
__global__ void __launch_bounds__(256) q_absorb_row_kernel(const float *q, DevMatrix kv_b, int64_t dn, int64_t dr,
                                                          int64_t dv, float *qcat) {
  __shared__ float part[8][kAbsorbMaxDc];
  const int64_t dc = kv_b.cols, h = blockIdx.x, kvw = dn + dv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c0 = int64_t(lane) * 16;
  const float *qh = q + h * (dn + dr);
  float acc[16];
#pragma unroll
  for (int j = 0; j < 16; j++) acc[j] = 0.0f;
  if (c0 < dc) {
#pragma unroll 4
    for (int64_t d = warp; d < dn; d += 8) {
      const int64_t row = h * kvw + d;
      float wv[16];
      if (kv_b.dtype == kFP8) {
        fp8x16_to_f32(load_stream(static_cast<const uint8_t *>(kv_b.data) + row * dc + c0), wv);
        const float sc = kv_b.scale[(row / 128) * kv_b.scale_cols + c0 / 128];
#pragma unroll
        for (int j = 0; j < 16; j++) wv[j] *= sc;
      } else {
#pragma unroll
        for (int j = 0; j < 16; j++) wv[j] = load_w(kv_b, row, c0 + j);
      }
      const float qv = qh[d];
#pragma unroll
      for (int j = 0; j < 16; j++) acc[j] += qv * wv[j];
    }
#pragma unroll
    for (int j = 0; j < 16; j++) part[warp][c0 + j] = acc[j];
  }
  __syncthreads();
  float *out = qcat + h * (dc + dr);
  for (int64_t c = threadIdx.x; c < dc; c += blockDim.x) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; w++) v += part[w][c];
    out[c] = v;
  }
  for (int64_t k = threadIdx.x; k < dr; k += blockDim.x) out[dc + k] = qh[dn + k];
}

// out[r, h*dv + v] = W_UV[h][v, :] . o_lat[r, h]: a warp per four consecutive v of one head (dv % 4 == 0),
// which share each chunk of o_lat[r, h], MT rows at a time (gemv.cuh).
template <int MT>
__global__ void __launch_bounds__(256) out_absorb_kernel(const float *olat, DevMatrix kv_b, int64_t nh, int64_t dn,
                                                        int64_t dv, float *out, int64_t os) {
  const int lane = threadIdx.x & 31;
  const int64_t hv = (int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5)) * 4;
  if (hv >= nh * dv) return;
  const int64_t h = hv / dv, v = hv % dv, dc = kv_b.cols;
  const DevMatrix *ws[4] = {&kv_b, &kv_b, &kv_b, &kv_b};
  int64_t ns[4];
  float acc[4][MT];
#pragma unroll
  for (int j = 0; j < 4; j++) {
    ns[j] = h * (dn + dv) + dn + v + j;
#pragma unroll
    for (int t = 0; t < MT; t++) acc[j][t] = 0.0f;
  }
  rows_dot<MT, 4>(ws, ns, olat + h * dc, nh * dc, lane, acc);
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int t = 0; t < MT; t++) {
      const float a = warp_sum(acc[j][t]);
      if (lane == 0) out[t * os + hv + j] = a;
    }
}


// ---- tensor-core kernels

constexpr int kTcThreads = 128;    // 4 warps
constexpr int kTcBN = 64;          // output columns per block (16 per warp)
constexpr int kTcKC = 64;          // K per staged chunk: four k16 steps
constexpr int kSA = kTcKC / 2 + 4;  // 32-bit words per staged activation row (and out_absorb weight row): 36
constexpr int kSN = kTcBN + 8;      // bf16 per staged q_absorb weight row: 72
// Blocks per SM asked of ptxas: the 64-row tiles within 128 registers (4 blocks of 128 threads per SM; without
// it the FP8 out_absorb took 130, 3 blocks); smaller tiles as ptxas likes (0: no minimum; they take 48-80).
template <int MT>
constexpr int kTcMinBlocks = MT == 4 ? 4 : 0;

// Two bf16 as one register: `lo` (the lower k or the lower address) in the low 16 bits.
__device__ __forceinline__ uint32_t pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}

// Four consecutive weights as four bf16 (in memory order: .x low half = the first), exact: e4m3 -> half ->
// float -> bf16 for FP8 (4 bytes at base + off), a plain 8-byte load for BF16 (element off).
template <bool FP8>
__device__ __forceinline__ uint2 load_w4_bf16(const void *base, int64_t off) {
  if constexpr (FP8) {
    const uint32_t w4 = *reinterpret_cast<const uint32_t *>(static_cast<const uint8_t *>(base) + off);
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w4 & 0xffff), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w4 >> 16), __NV_E4M3);
    const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
    return make_uint2(pack_bf16x2(__float2bfloat16_rn(a.x), __float2bfloat16_rn(a.y)),
                      pack_bf16x2(__float2bfloat16_rn(b.x), __float2bfloat16_rn(b.y)));
  } else {
    return *reinterpret_cast<const uint2 *>(static_cast<const uint16_t *>(base) + off);
  }
}

// Activation chunk [BM rows][kTcKC] from x[r][k] = src[r * ld + k0 + k] (zero for r >= n_rows or k0 + k >= K)
// into hi/lo words [BM][kSA]: word p = (k 2p, k 2p+1), hi = bf16(x), lo = bf16(x - hi).
template <int BM>
__device__ __forceinline__ void stage_act(uint32_t *hi, uint32_t *lo, const float *src, int64_t ld, int n_rows,
                                          int64_t k0, int64_t K) {
  for (int i = threadIdx.x; i < BM * (kTcKC / 2); i += kTcThreads) {
    const int r = i / (kTcKC / 2), p = i % (kTcKC / 2);
    const int64_t k = k0 + 2 * p;
    float x0 = 0.0f, x1 = 0.0f;
    if (r < n_rows) {
      if (k < K) x0 = src[int64_t(r) * ld + k];
      if (k + 1 < K) x1 = src[int64_t(r) * ld + k + 1];
    }
    const __nv_bfloat16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
    hi[r * kSA + p] = pack_bf16x2(h0, h1);
    lo[r * kSA + p] = pack_bf16x2(__float2bfloat16_rn(x0 - __bfloat162float(h0)),
                                  __float2bfloat16_rn(x1 - __bfloat162float(h1)));
  }
}

// For each m tile i and this warp's n8 tile j: part += (A_hi + A_lo)[i] * B[j] over k16 step s of the chunk.
template <int MT>
__device__ __forceinline__ void mma_step(const uint32_t *hi, const uint32_t *lo, int s, const uint32_t (&b)[2][2],
                                         float (&part)[MT][2][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; i++) {
    const int w0 = (16 * i + g) * kSA + 8 * s + t;
    const uint32_t ah[4] = {hi[w0], hi[w0 + 8 * kSA], hi[w0 + 4], hi[w0 + 8 * kSA + 4]};
    const uint32_t al[4] = {lo[w0], lo[w0 + 8 * kSA], lo[w0 + 4], lo[w0 + 8 * kSA + 4]};
#pragma unroll
    for (int j = 0; j < 2; j++) {
      mma_bf16(part[i][j], ah, b[j][0], b[j][1]);
      mma_bf16(part[i][j], al, b[j][0], b[j][1]);
    }
  }
}

// res += part * scale of n8 tile j (s0, s1); part = 0.
template <int MT>
__device__ __forceinline__ void flush(float (&res)[MT][2][4], float (&part)[MT][2][4], float s0, float s1) {
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      res[i][0][q] += part[i][0][q] * s0;
      res[i][1][q] += part[i][1][q] * s1;
      part[i][0][q] = 0.0f;
      part[i][1][q] = 0.0f;
    }
}

// qcat[r, h, c] for rows r0 .. r0 + 16*MT - 1 (< rows), columns c0 .. c0 + 63 (< dc) of head h; the column-tile-0
// blocks also copy q_pe. Block (column tile, head, row tile).
template <int MT, bool FP8>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks<MT>)
    q_absorb_tc_kernel(const float *__restrict__ q, int64_t qs, int64_t rows, DevMatrix kv_b, int64_t nh, int64_t dn,
                       int64_t dr, int64_t dv, float *__restrict__ qcat) {
  constexpr int BM = 16 * MT;
  __shared__ __align__(16) uint32_t a_hi[BM * kSA], a_lo[BM * kSA];
  __shared__ __align__(16) uint16_t ws[kTcKC * kSN];  // bf16 bits
  const int64_t dc = kv_b.cols, h = blockIdx.y, r0 = int64_t(blockIdx.z) * BM, c0 = int64_t(blockIdx.x) * kTcBN;
  const int64_t row0 = h * (dn + dv);  // W_UK[h]'s first row of kv_b
  const int n_rows = int(min(int64_t(BM), rows - r0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const float *src = q + r0 * qs + h * (dn + dr);
  float res[MT][2][4] = {}, part[MT][2][4] = {};
  int64_t cur = -1;  // the scale row block `part` belongs to (FP8)
  auto scales = [&](float &s0, float &s1) {
    s0 = s1 = 1.0f;
    if constexpr (FP8) {
      const int64_t c = c0 + 16 * warp;  // first column of n8 tile 0; tile 1 is 8 further (both 8-aligned)
      s0 = c < dc ? kv_b.scale[cur * kv_b.scale_cols + c / 128] : 0.0f;
      s1 = c + 8 < dc ? kv_b.scale[cur * kv_b.scale_cols + (c + 8) / 128] : 0.0f;
    }
  };
  for (int64_t k0 = 0; k0 < dn; k0 += kTcKC) {
    stage_act<BM>(a_hi, a_lo, src, qs, n_rows, k0, dn);
    for (int i = threadIdx.x; i < kTcKC * (kTcBN / 4); i += kTcThreads) {  // W[row0 + k0 + k][c0 + 4n4 .. +3]
      const int k = i / (kTcBN / 4), n4 = i % (kTcBN / 4);
      const int64_t d = k0 + k, c = c0 + 4 * n4;
      uint2 v = make_uint2(0, 0);
      if (d < dn && c < dc) v = load_w4_bf16<FP8>(kv_b.data, (row0 + d) * dc + c);
      *reinterpret_cast<uint2 *>(&ws[k * kSN + 4 * n4]) = v;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kTcKC / 16; s++) {
      if (k0 + 16 * s >= dn) break;  // (block-uniform)
      if constexpr (FP8) {
        const int64_t blk = (row0 + k0 + 16 * s) / 128;  // one row block for all 16 k (row0 % 16 == 0)
        if (blk != cur) {
          if (cur >= 0) {
            float s0, s1;
            scales(s0, s1);
            flush<MT>(res, part, s0, s1);
          }
          cur = blk;
        }
      }
      uint32_t b[2][2];
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int n = 16 * warp + 8 * j + g, k = 16 * s + 2 * t;
        b[j][0] = uint32_t(ws[k * kSN + n]) | (uint32_t(ws[(k + 1) * kSN + n]) << 16);
        b[j][1] = uint32_t(ws[(k + 8) * kSN + n]) | (uint32_t(ws[(k + 9) * kSN + n]) << 16);
      }
      mma_step<MT>(a_hi, a_lo, s, b, part);
    }
    __syncthreads();  // the chunk is consumed before the next one overwrites it
  }
  if (!FP8 || cur >= 0) {  // (cur >= 0 always: K >= 1 runs a step)
    float s0, s1;
    scales(s0, s1);
    flush<MT>(res, part, s0, s1);
  }
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = 16 * i + g + (e >> 1) * 8;
        const int64_t c = c0 + 16 * warp + 8 * j + 2 * t + (e & 1);
        if (r < n_rows && c < dc) qcat[((r0 + r) * nh + h) * (dc + dr) + c] = res[i][j][e];
      }
  if (blockIdx.x == 0)
    for (int64_t i = threadIdx.x; i < int64_t(n_rows) * dr; i += kTcThreads) {
      const int64_t r = i / dr, k = i % dr;
      qcat[((r0 + r) * nh + h) * (dc + dr) + dc + k] = src[r * qs + dn + k];
    }
}

// out[r, h*dv + v] for rows r0 .. r0 + 16*MT - 1 (< rows), v = v0 .. v0 + 63 (< dv) of head h. Block (column
// tile, head, row tile).
template <int MT, bool FP8>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks<MT>)
    out_absorb_tc_kernel(const float *__restrict__ olat, int64_t rows, DevMatrix kv_b, int64_t nh, int64_t dn,
                         int64_t dv, float *__restrict__ out, int64_t os) {
  constexpr int BM = 16 * MT;
  __shared__ __align__(16) uint32_t a_hi[BM * kSA], a_lo[BM * kSA], ws[kTcBN * kSA];
  const int64_t dc = kv_b.cols, h = blockIdx.y, r0 = int64_t(blockIdx.z) * BM, v0 = int64_t(blockIdx.x) * kTcBN;
  const int64_t row0 = h * (dn + dv) + dn;  // W_UV[h]'s first row of kv_b
  const int n_rows = int(min(int64_t(BM), rows - r0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const float *src = olat + (r0 * nh + h) * dc;  // row r at src + r * nh * dc
  float res[MT][2][4] = {}, part[MT][2][4] = {};
  int64_t cur = -1;  // the K block (c / 128) `part` belongs to (FP8)
  auto scales = [&](float &s0, float &s1) {
    s0 = s1 = 1.0f;
    if constexpr (FP8) {
      const int64_t v = v0 + 16 * warp;  // first column of n8 tile 0; tile 1 is 8 further (row0 % 8 == 0)
      s0 = v < dv ? kv_b.scale[((row0 + v) / 128) * kv_b.scale_cols + cur] : 0.0f;
      s1 = v + 8 < dv ? kv_b.scale[((row0 + v + 8) / 128) * kv_b.scale_cols + cur] : 0.0f;
    }
  };
  for (int64_t k0 = 0; k0 < dc; k0 += kTcKC) {
    stage_act<BM>(a_hi, a_lo, src, nh * dc, n_rows, k0, dc);
    for (int i = threadIdx.x; i < kTcBN * (kTcKC / 4); i += kTcThreads) {  // W[row0 + v0 + n][k0 + 4k4 .. +3]
      const int n = i / (kTcKC / 4), k4 = i % (kTcKC / 4);
      const int64_t v = v0 + n, c = k0 + 4 * k4;
      uint2 w = make_uint2(0, 0);
      if (v < dv && c < dc) w = load_w4_bf16<FP8>(kv_b.data, (row0 + v) * dc + c);
      *reinterpret_cast<uint2 *>(&ws[n * kSA + 2 * k4]) = w;
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kTcKC / 16; s++) {
      if (k0 + 16 * s >= dc) break;  // (block-uniform)
      if constexpr (FP8) {
        const int64_t blk = (k0 + 16 * s) / 128;
        if (blk != cur) {
          if (cur >= 0) {
            float s0, s1;
            scales(s0, s1);
            flush<MT>(res, part, s0, s1);
          }
          cur = blk;
        }
      }
      uint32_t b[2][2];
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int w0 = (16 * warp + 8 * j + g) * kSA + 8 * s + t;
        b[j][0] = ws[w0];
        b[j][1] = ws[w0 + 4];
      }
      mma_step<MT>(a_hi, a_lo, s, b, part);
    }
    __syncthreads();
  }
  if (!FP8 || cur >= 0) {  // (cur >= 0 always: K >= 1 runs a step)
    float s0, s1;
    scales(s0, s1);
    flush<MT>(res, part, s0, s1);
  }
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int r = 16 * i + g + (e >> 1) * 8;
        const int64_t v = v0 + 16 * warp + 8 * j + 2 * t + (e & 1);
        if (r < n_rows && v < dv) out[(r0 + r) * os + h * dv + v] = res[i][j][e];
      }
}

// m16 tiles per block for a row count: the smallest of 1, 2, 4 that covers it (4 beyond 32 rows).
int tc_mt(int64_t rows) { return rows <= 16 ? 1 : rows <= 32 ? 2 : 4; }

bool tc_common(int64_t rows, const DevMatrix &kv_b, int64_t nh) {
  return rows >= 2 && kv_b.cols > 0 && kv_b.cols % 4 == 0 && nh >= 1 && nh <= 65535 &&
         reinterpret_cast<uintptr_t>(kv_b.data) % 16 == 0 &&
         (kv_b.dtype == kBF16 || (kv_b.dtype == kFP8 && kv_b.scale != nullptr)) &&
         (rows + 16 * tc_mt(rows) - 1) / (16 * tc_mt(rows)) <= 65535;  // row tiles: gridDim.z
}

template <int MT>
void launch_q_tc(const float *q, int64_t qs, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dr,
                 int64_t dv, float *qcat, cudaStream_t s) {
  const dim3 grid(unsigned((kv_b.cols + kTcBN - 1) / kTcBN), unsigned(nh), unsigned((rows + 16 * MT - 1) / (16 * MT)));
  if (kv_b.dtype == kFP8)
    q_absorb_tc_kernel<MT, true><<<grid, kTcThreads, 0, s>>>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat);
  else
    q_absorb_tc_kernel<MT, false><<<grid, kTcThreads, 0, s>>>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat);
}

template <int MT>
void launch_out_tc(const float *olat, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv,
                   float *out, int64_t os, cudaStream_t s) {
  const dim3 grid(unsigned((dv + kTcBN - 1) / kTcBN), unsigned(nh), unsigned((rows + 16 * MT - 1) / (16 * MT)));
  if (kv_b.dtype == kFP8)
    out_absorb_tc_kernel<MT, true><<<grid, kTcThreads, 0, s>>>(olat, rows, kv_b, nh, dn, dv, out, os);
  else
    out_absorb_tc_kernel<MT, false><<<grid, kTcThreads, 0, s>>>(olat, rows, kv_b, nh, dn, dv, out, os);
}

}  // namespace

bool mla_q_absorb_tc(int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv) {
  return tc_common(rows, kv_b, nh) && dn >= 1 && dv >= 0 && (kv_b.dtype == kBF16 || (dn + dv) % 16 == 0);
}

bool mla_out_absorb_tc(int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv) {
  return tc_common(rows, kv_b, nh) && dv >= 1 && dn >= 0 &&
         (kv_b.dtype == kBF16 || ((dn + dv) % 8 == 0 && dn % 8 == 0));
}

void mla_q_absorb(const float *q, int64_t qs, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dr,
                  int64_t dv, float *qcat, cudaStream_t s) {
  if (rows == 0) return;
  const int64_t dc = kv_b.cols;
  if (mla_q_absorb_tc(rows, kv_b, nh, dn, dv)) {
    switch (tc_mt(rows)) {
      case 1: launch_q_tc<1>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat, s); break;
      case 2: launch_q_tc<2>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat, s); break;
      default: launch_q_tc<4>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat, s); break;
    }
    check_launch("mla q_absorb (tensor cores)");
    return;
  }
  const dim3 grid(unsigned((dc + 127) / 128), unsigned(nh), unsigned((rows + 7) / 8));
  if (rows == 1 && dc % 16 == 0 && dc <= kAbsorbMaxDc)  // decode
    q_absorb_row_kernel<<<unsigned(nh), 256, 0, s>>>(q, kv_b, dn, dr, dv, qcat);
  else
    q_absorb_kernel<8><<<grid, 256, 0, s>>>(q, qs, rows, kv_b, nh, dn, dr, dv, qcat);
  check_launch("mla q_absorb");
}

void mla_out_absorb(const float *olat, int64_t rows, const DevMatrix &kv_b, int64_t nh, int64_t dn, int64_t dv,
                    float *out, int64_t os, cudaStream_t s) {
  if (rows == 0) return;
  const int64_t dc = kv_b.cols;
  if (mla_out_absorb_tc(rows, kv_b, nh, dn, dv)) {
    switch (tc_mt(rows)) {
      case 1: launch_out_tc<1>(olat, rows, kv_b, nh, dn, dv, out, os, s); break;
      case 2: launch_out_tc<2>(olat, rows, kv_b, nh, dn, dv, out, os, s); break;
      default: launch_out_tc<4>(olat, rows, kv_b, nh, dn, dv, out, os, s); break;
    }
    check_launch("mla out_absorb (tensor cores)");
    return;
  }
  if (dv % 4) throw std::runtime_error("mla_out_absorb: v_head_dim must be a multiple of 4");
  const unsigned blocks = unsigned((nh * dv / 4 + 7) / 8);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    out_absorb_kernel<4><<<blocks, 256, 0, s>>>(olat + r * nh * dc, kv_b, nh, dn, dv, out + r * os, os);
  for (; r < rows; r++) out_absorb_kernel<1><<<blocks, 256, 0, s>>>(olat + r * nh * dc, kv_b, nh, dn, dv, out + r * os, os);
  check_launch("mla out_absorb");
}

}  // namespace dsrt::kernels
