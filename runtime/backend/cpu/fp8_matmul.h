// FP8 (e4m3, 128x128 block scales) matrix times fp32 activations on the CPU: out[t, n] = sum_k x[t, k] W[n, k].
// The weights are read in place and decoded 32 at a time in registers (never a dequantised copy).
//
// Arithmetic, the same on every path (so results are bit-identical whichever path, thread count or batch ran):
// the K range of a row is cut at the tensor's 128-column block edges into segments; within a segment, lane
// l in 0..31 accumulates, with fused multiply-adds in ascending k, the products w' x of the elements whose offset
// from the segment's start is l mod 32; the 32 lanes are summed in a fixed tree ((l + l+16), then + 8, + 4, + 2,
// + 1); the row total is fma(segment sum, 256 x block scale, total) over the segments in ascending order. Each
// (token, row) is computed alone in that order, so a token's row does not depend on the batch or the split.
//
// e4m3 decode: w' = the fp16 whose bits are the byte's sign (bit 15) and 7 magnitude bits (at 7..13), which is
// the code's value x 2^-8, exactly (e4m3 subnormals become fp16 subnormals, widened to normal fp32). The NaN
// codes (0x7f, 0xff) decode as +-480, not NaN: checkpoints are written with saturating conversions and hold none.
#pragma once
#include <cstdint>

#include "model/weights.h"

namespace dsrt::fp8 {

enum class Path : uint8_t { Auto, Scalar, Avx2, Avx512 };

// The fastest path this CPU runs (AVX-512 F/BW/VL, else AVX2 + FMA + F16C, else scalar), or the one the
// environment's DSRT_CPU_FP8_PATH (scalar, avx2, avx512) names, if this CPU runs it.
Path best_path();
bool path_supported(Path p);
const char *path_name(Path p);

// out[t * ldo + n] for t in [0, m), n in [n0, n1) (rows of the view w; w.dtype must be F8_E4M3).
// x[t * ldx + k] for k in [0, w.cols). Path::Auto = best_path(). Single-threaded: callers split rows.
void matmul_rows(const Weight &w, const float *x, int64_t m, int64_t ldx, float *out, int64_t ldo, int64_t n0,
                 int64_t n1, Path path = Path::Auto);

}  // namespace dsrt::fp8
