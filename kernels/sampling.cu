// Sampling on the device (kernels.h, "sampling.cu"): one block per row, every row of a step in one launch.
// The CPU sampler (engine/sampler.cpp) is the reference: the same adjusted logits (in double), the same
// candidate order (logit descending, ties to the lower id), the same truncations and the same walk over the
// kept ids in ascending id order. Only the order of double-precision sums differs (tree reductions here,
// sorted-order loops there), so a token can differ only when u lands within rounding of a boundary.
//
// Per row: (1) the row into the workspace as doubles, raw logits checked; (2) the touched ids adjusted;
// (3) the first argmax (greedy rows stop here); (4) top-k: radix select of the k-th key by count, ties at
// the cut to the lowest ids; (5) z = sum of exp((v - max) / T) over the candidates; (6) top-p: radix select of
// the key where the mass reaches top_p, ties at the cut by id as the CPU's running sum; (7) min-p: a floor on
// q; (8) the kept mass, then the draw: per-thread id chunks, an inclusive scan of their mass, and the first
// chunk whose end passes u walked id by id.
#include <cstdint>

#include "common.cuh"

namespace dsrt::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCopies = 8;  // histogram copies (warp w uses copy w % kCopies): less contention on a hot bin

struct Shared {
  uint32_t cnt[kCopies][256];
  double mass[kCopies][256];
  double red_d[kWarps];
  long long red_l[kWarps];
  double red_v[kWarps];
  int32_t digit;
  long long rem;
  double mass_above;
  int32_t found;
  long long id;
};

// Doubles in ascending order as unsigned keys in ascending order (zero canonicalised to +0 before).
__device__ __forceinline__ uint64_t key_of(double v) {
  const uint64_t b = uint64_t(__double_as_longlong(v));
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}
__device__ __forceinline__ double value_of(uint64_t k) {
  const uint64_t b = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
  return __longlong_as_double((long long)b);
}
__device__ __forceinline__ double canon(double v) { return v == 0.0 ? 0.0 : v; }

__device__ double block_sum_d(double v, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) sh.red_d[warp] = v;
  __syncthreads();
  double t = 0;
  for (int w = 0; w < kWarps; w++) t += sh.red_d[w];  // every thread in the same order: one result
  return t;
}
__device__ long long block_sum_l(long long v, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) sh.red_l[warp] = v;
  __syncthreads();
  long long t = 0;
  for (int w = 0; w < kWarps; w++) t += sh.red_l[w];
  return t;
}
__device__ long long block_min_l(long long v, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh.red_l[warp] = v;
  __syncthreads();
  long long t = sh.red_l[0];
  for (int w = 1; w < kWarps; w++) t = min(t, sh.red_l[w]);
  return t;
}
__device__ long long block_max_l(long long v, Shared &sh) { return -block_min_l(-v, sh); }
// The first index of the largest value: (value, index) pairs, index -1 for none (all -inf).
__device__ void block_argmax(double &bv, long long &bi, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto better = [](double v, long long i, double w, long long j) {  // (v, i) beats (w, j)
    return v > w || (v == w && i >= 0 && (j < 0 || i < j));
  };
  for (int o = 16; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __syncthreads();
  if (lane == 0) sh.red_v[warp] = bv, sh.red_l[warp] = bi;
  __syncthreads();
  bv = sh.red_v[0];
  bi = sh.red_l[0];
  for (int w = 1; w < kWarps; w++)
    if (better(sh.red_v[w], sh.red_l[w], bv, bi)) bv = sh.red_v[w], bi = sh.red_l[w];
}
// Inclusive scan over threads in thread order (deterministic).
__device__ double block_inclusive_scan_d(double v, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) sh.red_d[warp] = v;
  __syncthreads();
  double before = 0;
  for (int w = 0; w < warp; w++) before += sh.red_d[w];
  return before + v;
}
__device__ long long block_inclusive_scan_l(long long v, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const long long n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) sh.red_l[warp] = v;
  __syncthreads();
  long long before = 0;
  for (int w = 0; w < warp; w++) before += sh.red_l[w];
  return before + v;
}

// The state of one row's selection: the candidates so far are the ids with v > cut_v, or v == cut_v and
// id <= cut_id (a prefix of the order by value descending, then id ascending), and finite.
struct Row {
  const double *w;
  int64_t V;
  double cut_v;
  long long cut_id;
  __device__ bool cand(int64_t i, double v) const { return v > -INFINITY && (v > cut_v || (v == cut_v && i <= cut_id)); }
};

// The n-th (1-based) lowest id with value == v among the candidates. Contiguous id chunks per thread.
__device__ long long nth_equal_id(const Row &r, double v, long long n, Shared &sh) {
  const int64_t chunk = (r.V + kThreads - 1) / kThreads;
  const int64_t lo = min(int64_t(threadIdx.x) * chunk, r.V), hi = min(lo + chunk, r.V);
  long long c = 0;
  for (int64_t i = lo; i < hi; i++) c += (r.w[i] == v && r.cand(i, r.w[i])) ? 1 : 0;
  const long long incl = block_inclusive_scan_l(c, sh), excl = incl - c;
  if (threadIdx.x == 0) sh.id = -1;
  __syncthreads();
  if (c > 0 && excl < n && n <= incl) {
    long long j = excl;
    for (int64_t i = lo; i < hi; i++)
      if (r.w[i] == v && r.cand(i, r.w[i]) && ++j == n) {
        sh.id = i;
        break;
      }
  }
  __syncthreads();
  return sh.id;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float *logits, int64_t V, const char *params,
                                                          int32_t n_rows, double *work, int32_t *tokens,
                                                          int32_t *flags) {
  __shared__ Shared sh;
  const SampleRowParams *rows = reinterpret_cast<const SampleRowParams *>(params);
  const SampleRowParams P = rows[blockIdx.x];
  const SampleAdjust *adj = reinterpret_cast<const SampleAdjust *>(params + int64_t(n_rows) * sizeof(SampleRowParams));
  const float *bias = reinterpret_cast<const float *>(params + P.bias_at);
  const float *x = logits + int64_t(P.row) * V;
  double *w = work + int64_t(blockIdx.x) * V;
  double *q = work + (int64_t(n_rows) + blockIdx.x) * V;  // a candidate's probability q_i = e_i / z, from (5) on
  const int tid = threadIdx.x;
  auto done = [&](int32_t tok, int32_t flag) {
    if (tid == 0) {
      tokens[blockIdx.x] = tok;
      flags[blockIdx.x] = flag;
    }
  };

  // (1) raw logits: a NaN or +inf is the sampler's error
  long long bad = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    const float v = x[i];
    bad |= !(v < INFINITY);
    w[i] = canon(double(v));
  }
  __syncthreads();
  // (2) bias, penalties, bans (each touched id once, so no two threads write one element)
  for (int a = tid; a < P.n_adj; a += kThreads) {
    const SampleAdjust A = adj[P.adj0 + a];
    double v = w[A.id];
    for (int j = 0; j < A.n_bias; j++) v += double(bias[A.bias0 + j]);
    if (A.count > 0) {
      if (P.repetition_penalty != 1.0f)
        v = v > 0 ? v / double(P.repetition_penalty) : v * double(P.repetition_penalty);
      v -= double(P.presence_penalty) + double(P.frequency_penalty) * A.count;
    }
    if (A.banned) v = -INFINITY;
    bad |= !(v < INFINITY);
    w[A.id] = canon(v);
  }
  __syncthreads();
  // (2b) bans (after the adjustments: a ban wins)
  const int32_t *bans = reinterpret_cast<const int32_t *>(params + P.bans_at) + P.ban0;
  for (int j = tid; j < P.n_ban; j += kThreads)
    if (bans[j] >= 0 && bans[j] < V) w[bans[j]] = -INFINITY;
  if (block_max_l(bad, sh)) return done(-1, 1);  // (block_max_l syncs: the adjusted values are visible below)

  // (3) the first id of the largest value
  double bv = -INFINITY;
  long long bi = -1;
  for (int64_t i = tid; i < V; i += kThreads) {
    const double v = w[i];
    if (v > bv) bv = v, bi = i;  // strided ids ascend per thread: the first of equal values stays
  }
  block_argmax(bv, bi, sh);
  if (!(bv > -INFINITY) || bi < 0) return done(-1, 1);  // nothing finite to sample
  if (!(P.temperature > 0.0f)) return done(int32_t(bi), 0);
  const double mx = bv, T = double(P.temperature);

  Row r{w, V, -INFINITY, (long long)V};  // every finite id
  // (4) top-k: the k-th key by count; ties at the cut go to the lowest ids
  const int64_t k = P.top_k > 0 ? min(int64_t(P.top_k), V) : V;
  const int hc = (tid >> 5) % kCopies;
  if (k < V) {
    uint64_t prefix = 0, mask = 0;
    long long rem = k;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int j = tid; j < kCopies * 256; j += kThreads) sh.cnt[j / 256][j % 256] = 0;
      __syncthreads();
      // Each thread runs a count per bin while its bin stays the same (in the first passes most values share
      // their leading byte): one shared atomic per run, not per id.
      int cb = -1;
      uint32_t cc = 0;
      for (int64_t i = tid; i < V; i += kThreads) {
        const uint64_t key = key_of(w[i]);
        if ((key & mask) != prefix) continue;
        const int b = int((key >> shift) & 255);
        if (b != cb) {
          if (cb >= 0) atomicAdd(&sh.cnt[hc][cb], cc);
          cb = b;
          cc = 0;
        }
        cc++;
      }
      if (cb >= 0) atomicAdd(&sh.cnt[hc][cb], cc);
      __syncthreads();
      if (tid == 0) {
        int b = 255;
        for (; b > 0; b--) {
          long long c = 0;
          for (int j = 0; j < kCopies; j++) c += sh.cnt[j][b];
          if (c >= rem) break;
          rem -= c;
        }
        sh.digit = b;
        sh.rem = rem;
      }
      __syncthreads();
      prefix |= uint64_t(sh.digit) << shift;
      mask |= uint64_t(0xff) << shift;
      rem = sh.rem;
      __syncthreads();
    }
    const double cv = value_of(prefix);
    const long long id = nth_equal_id(r, cv, rem, sh);
    r.cut_v = cv;
    r.cut_id = id;
  }

  // (5) the normaliser over the candidates (q_i = e_i / z, as the CPU). Each candidate's q is computed once
  // here and read by the passes below: one double exp and division per id instead of one per pass (the
  // kernel runs on one SM per row; double exp was most of a sampled step's time).
  double zp = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    const double v = w[i];
    if (r.cand(i, v)) zp += (q[i] = exp((v - mx) / T));
  }
  const double z = block_sum_d(zp, sh);
  for (int64_t i = tid; i < V; i += kThreads)
    if (r.cand(i, w[i])) q[i] = q[i] / z;
  __syncthreads();  // (8) reads q in contiguous chunks, not in this loop's stride

  // (6) top-p: the smallest prefix (in candidate order) whose mass reaches top_p
  if (P.top_p < 1.0f) {
    const double p = double(P.top_p);
    uint64_t prefix = 0, mask = 0;
    double above = 0;  // mass of the candidates with keys above the current bucket
    bool found = true;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int j = tid; j < kCopies * 256; j += kThreads) sh.cnt[j / 256][j % 256] = 0, sh.mass[j / 256][j % 256] = 0;
      __syncthreads();
      int cb = -1;  // runs of one bin per thread, as in (4)
      uint32_t cc = 0;
      double cm = 0;
      for (int64_t i = tid; i < V; i += kThreads) {
        const double v = w[i];
        if (!r.cand(i, v)) continue;
        const uint64_t key = key_of(v);
        if ((key & mask) != prefix) continue;
        const int b = int((key >> shift) & 255);
        if (b != cb) {
          if (cb >= 0) atomicAdd(&sh.cnt[hc][cb], cc), atomicAdd(&sh.mass[hc][cb], cm);
          cb = b;
          cc = 0;
          cm = 0;
        }
        cc++;
        cm += q[i];
      }
      if (cb >= 0) atomicAdd(&sh.cnt[hc][cb], cc), atomicAdd(&sh.mass[hc][cb], cm);
      __syncthreads();
      if (tid == 0) {
        int b = 255, chosen = -1, lowest = -1;
        double lowest_m = 0;
        for (; b >= 0; b--) {
          long long c = 0;
          double m = 0;
          for (int j = 0; j < kCopies; j++) c += sh.cnt[j][b], m += sh.mass[j][b];
          if (c == 0) continue;
          if (above + m >= p) {
            chosen = b;
            break;
          }
          above += m;
          lowest = b;
          lowest_m = m;
        }
        // Below the first level the bucket reached top_p as a whole; sums in another order may leave its parts a
        // rounding short: the cut is then at its last ids.
        if (chosen < 0 && shift < 56 && lowest >= 0) chosen = lowest, above -= lowest_m;
        sh.found = chosen >= 0;
        sh.digit = chosen;
        sh.mass_above = above;
      }
      __syncthreads();
      found = sh.found;
      above = sh.mass_above;
      if (!found) break;  // rounding left the total below top_p: the CPU keeps every candidate
      prefix |= uint64_t(sh.digit) << shift;
      mask |= uint64_t(0xff) << shift;
      __syncthreads();
    }
    if (found) {
      const double pv = value_of(prefix);
      long long group = 0;  // candidates of that value
      for (int64_t i = tid; i < V; i += kThreads) group += (w[i] == pv && r.cand(i, w[i])) ? 1 : 0;
      group = block_sum_l(group, sh);
      const double qv = exp((pv - mx) / T) / z;
      long long j = 1;  // the CPU's running sum goes on id by id through the tied group: at least one is kept
      double acc = above + qv;
      while (acc < p && j < group) acc += qv, j++;
      const long long id = nth_equal_id(r, pv, j, sh);
      r.cut_v = pv;
      r.cut_id = id;
    }
  }

  // (7) min-p: q >= min_p * q_max within the prefix (q falls along the order: the kept ids stay a prefix); when
  // not even the top passes (min_p > 1), the top alone
  const bool minp = P.min_p > 0.0f;
  const double q0 = 1.0 / z;  // exp(0) / z
  const double floor_q = double(P.min_p) * q0;
  const bool top_only = minp && !(q0 >= floor_q);
  auto kept = [&](int64_t i, double v, double &qi) {
    if (!r.cand(i, v)) return false;
    qi = q[i];
    if (top_only) return i == bi;
    return !minp || qi >= floor_q;
  };

  // (8) the kept mass, then the draw over kept ids in ascending order
  double zkp = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    double qi;
    if (kept(i, w[i], qi)) zkp += qi;
  }
  const double zk = block_sum_d(zkp, sh);
  const int64_t chunk = (V + kThreads - 1) / kThreads;
  const int64_t lo = min(int64_t(tid) * chunk, V), hi = min(lo + chunk, V);
  double s = 0;
  long long last = -1;
  for (int64_t i = lo; i < hi; i++) {  // (ids whose probability underflowed to 0 are skipped, as the CPU skips them)
    double qi;
    if (!kept(i, w[i], qi) || !(qi / zk > 0)) continue;
    s += qi / zk;
    last = i;
  }
  const double incl = block_inclusive_scan_d(s, sh);
  const long long owner = block_min_l(last >= 0 && P.u < incl ? tid : kThreads, sh);
  const long long last_all = block_max_l(last, sh);
  if (owner == kThreads) return done(int32_t(last_all), 0);  // rounding left u past the total: the last kept id
  if (tid == owner) {
    double acc = incl - s;
    long long tok = last;
    for (int64_t i = lo; i < hi; i++) {
      double qi;
      if (!kept(i, w[i], qi) || !(qi / zk > 0)) continue;
      acc += qi / zk;
      if (P.u < acc) {
        tok = i;
        break;
      }
    }
    tokens[blockIdx.x] = int32_t(tok);
    flags[blockIdx.x] = 0;
  }
}

}  // namespace

// Per row: the adjusted values and the candidates' probabilities, V doubles each.
int64_t sample_workspace_bytes(int64_t n_rows, int64_t vocab) { return 2 * n_rows * vocab * int64_t(sizeof(double)); }

void sample_rows(const float *logits, int64_t vocab, const void *params, int32_t n_rows, void *workspace, int32_t *tokens,
                 int32_t *flags, cudaStream_t s) {
  static_assert(sizeof(SampleRowParams) == 64 && sizeof(SampleAdjust) == 20, "the parameter block's layout");
  if (n_rows <= 0) return;
  sample_kernel<<<unsigned(n_rows), kThreads, 0, s>>>(logits, vocab, static_cast<const char *>(params), n_rows,
                                                      static_cast<double *>(workspace), tokens, flags);
  check_launch("sample_rows");
}

}  // namespace dsrt::kernels
