// Sampling on the device (kernels.h, "sampling.cu"): every row of a step in one launch, each row on a cluster
// of C thread blocks (C = 8 for small batches, fewer as the rows fill the GPU). The CPU sampler
// (engine/sampler.cpp) is the reference: the same adjusted logits (in double), the same candidate order (logit
// descending, ties to the lower id), the same truncations and the same walk over the kept ids in ascending id
// order. Only the order of double-precision sums differs (tree reductions here, sorted-order loops there), so a
// token can differ only when u lands within rounding of a boundary.
//
// Per row: (1) the row into the workspace as doubles, raw logits checked; (2) the touched ids adjusted;
// (3) the first argmax (greedy rows stop here); (4) top-k: radix select of the k-th key by count, ties at
// the cut to the lowest ids; (5) z = sum of exp((v - max) / T) over the candidates; (6) top-p: radix select of
// the key where the mass reaches top_p, ties at the cut by id as the CPU's running sum; (7) min-p: a floor on
// q; (8) the kept mass, then the draw: per-thread id chunks, an inclusive scan of their mass, and the first
// chunk whose end passes u walked id by id.
//
// Why a cluster: one block per row ran a top-p row (16 passes over 129,280 doubles with shared atomics) in
// ~1.05 ms on one SM - as long as the rest of a batch-1 V3 step. A row's C blocks split every pass over the
// ids (thread g = rank * 1024 + tid of C * 1024 walks ids g, g + C * 1024, ...); each reduction is a block
// reduction, then the blocks' partials read through distributed shared memory in rank order, so every thread
// of the cluster computes the same bits. A partial lives in one of two slots, alternating per reduction:
// the slot written again two reductions later is free, since every block has passed the barrier of the
// reduction between (and had finished reading before arriving there). Radix histograms go the same way (each
// block folds its copies into one histogram, the cluster sums them by rank), and the bin that holds the cut is
// found by one warp, eight bins per lane, instead of one thread walking 256 bins x 8 copies. A pass whose
// chosen bin holds one candidate ends its select (one more pass finds that candidate: its key is the cut).
#include <cooperative_groups.h>

#include <climits>
#include <cstdint>

#include "mma.cuh"

namespace dsrt::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCopies = 8;      // histogram copies (warp w uses copy w % kCopies): less contention on a hot bin
constexpr int kMaxCluster = 8;  // blocks per row (portable cluster size)

struct Pair {  // (value, id) of an argmax; id -1 for none
  double v;
  long long i;
};

struct Shared {
  uint32_t cnt[kCopies][256];
  double mass[kCopies][256];
  uint32_t bin_cnt[2][256];  // this block's histogram (copies summed), read by the cluster; two slots
  double bin_mass[2][256];
  uint32_t tot_cnt[256];     // the cluster's histogram (every block computes it alike)
  double tot_mass[256];
  double red_d[kWarps];
  long long red_l[kWarps];
  double red_v[kWarps];
  double part_d[2];  // this block's partial of a cluster reduction, two slots (see the top comment)
  long long part_l[2];
  Pair part_p[2];
  int32_t digit;
  long long rem;
  double mass_above;
  int32_t found;
};

// A thread's place in its row's cluster and the count of cluster-wide exchanges so far (every thread of the
// cluster runs the same sequence of them, so ph picks the same slot everywhere).
struct Cl {
  cg::cluster_group cl;
  int rank, C;
  int64_t g, G;
  int ph;
  __device__ int slot() { return ph++ & 1; }
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

// ---- block level (every thread of the block gets the same result)
template <class T>
__device__ T block_sum(T v, T *red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T t = 0;
  for (int w = 0; w < kWarps; w++) t += red[w];  // every thread in the same order: one result
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
// (v, i) beats (w, j): the larger value, then the lower id (-1: none)
__device__ __forceinline__ bool better(double v, long long i, double w, long long j) {
  return v > w || (v == w && i >= 0 && (j < 0 || i < j));
}
__device__ Pair block_argmax(double bv, long long bi, Shared &sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
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
  return {bv, bi};
}
// Inclusive scan over the block's threads in thread order (deterministic); total: the block's sum.
template <class T>
__device__ T block_inclusive_scan(T v, T *red, T &total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) red[warp] = v;
  __syncthreads();
  T before = 0, all = 0;
  for (int w = 0; w < kWarps; w++) {
    if (w < warp) before += red[w];
    all += red[w];
  }
  total = all;
  return before + v;
}

// ---- cluster level: the block's value t (alike in every thread of the block) into a slot, one cluster
// barrier, then the blocks' values combined in rank order.
template <class T, class F>
__device__ T cluster_combine(T t, T *slots, Cl &c, F op) {
  const int s = c.slot();
  if (threadIdx.x == 0) slots[s] = t;
  c.cl.sync();
  T r = *c.cl.map_shared_rank(&slots[s], 0);
  for (int k = 1; k < c.C; k++) r = op(r, *c.cl.map_shared_rank(&slots[s], k));
  return r;
}
__device__ double cl_sum_d(double v, Shared &sh, Cl &c) {
  return cluster_combine(block_sum(v, sh.red_d), sh.part_d, c, [](double a, double b) { return a + b; });
}
__device__ long long cl_sum_l(long long v, Shared &sh, Cl &c) {
  return cluster_combine(block_sum(v, sh.red_l), sh.part_l, c, [](long long a, long long b) { return a + b; });
}
__device__ long long cl_min_l(long long v, Shared &sh, Cl &c) {
  return cluster_combine(block_min_l(v, sh), sh.part_l, c, [](long long a, long long b) { return min(a, b); });
}
__device__ long long cl_max_l(long long v, Shared &sh, Cl &c) { return -cl_min_l(-v, sh, c); }
__device__ Pair cl_argmax(double bv, long long bi, Shared &sh, Cl &c) {
  return cluster_combine(block_argmax(bv, bi, sh), sh.part_p, c,
                         [](Pair a, Pair b) { return better(b.v, b.i, a.v, a.i) ? b : a; });
}
// Inclusive scan over the cluster's threads in (rank, thread) order.
template <class T>
__device__ T cl_inclusive_scan(T v, T *red, T *slots, Cl &c) {
  T total;
  const T incl = block_inclusive_scan(v, red, total);
  const int s = c.slot();
  if (threadIdx.x == 0) slots[s] = total;
  c.cl.sync();
  T before = 0;
  for (int k = 0; k < c.rank; k++) before += *c.cl.map_shared_rank(&slots[s], k);
  return before + incl;
}

// Radix pass, after each block has counted into sh.cnt (and sh.mass): the cluster's histogram into
// sh.tot_cnt / sh.tot_mass. Ends with a block barrier (the totals are visible to the whole block).
__device__ void cluster_histogram(Shared &sh, Cl &c, bool with_mass) {
  __syncthreads();
  const int s = c.slot();
  if (threadIdx.x < 256) {
    const int b = threadIdx.x;
    uint32_t n = 0;
    double m = 0;
    for (int j = 0; j < kCopies; j++) n += sh.cnt[j][b];
    if (with_mass)
      for (int j = 0; j < kCopies; j++) m += sh.mass[j][b];
    sh.bin_cnt[s][b] = n;
    sh.bin_mass[s][b] = m;
  }
  c.cl.sync();
  if (threadIdx.x < 256) {
    const int b = threadIdx.x;
    uint32_t n = 0;
    double m = 0;
    for (int k = 0; k < c.C; k++) {
      n += c.cl.map_shared_rank(&sh.bin_cnt[s][0], k)[b];
      m += c.cl.map_shared_rank(&sh.bin_mass[s][0], k)[b];
    }
    sh.tot_cnt[b] = n;
    sh.tot_mass[b] = m;
  }
  __syncthreads();
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

// The n-th (1-based) lowest id with value == v among the candidates, -1 if none. Contiguous id chunks per
// thread of the cluster.
__device__ long long nth_equal_id(const Row &r, double v, long long n, Shared &sh, Cl &c) {
  const int64_t chunk = (r.V + c.G - 1) / c.G;
  const int64_t lo = min(c.g * chunk, r.V), hi = min(lo + chunk, r.V);
  long long cnt = 0;
  for (int64_t i = lo; i < hi; i++) cnt += (r.w[i] == v && r.cand(i, r.w[i])) ? 1 : 0;
  const long long incl = cl_inclusive_scan(cnt, sh.red_l, sh.part_l, c), excl = incl - cnt;
  long long id = LLONG_MAX;
  if (cnt > 0 && excl < n && n <= incl) {
    long long j = excl;
    for (int64_t i = lo; i < hi; i++)
      if (r.w[i] == v && r.cand(i, r.w[i]) && ++j == n) {
        id = i;
        break;
      }
  }
  id = cl_min_l(id, sh, c);
  return id == LLONG_MAX ? -1 : id;
}

// A radix pass whose chosen bin holds one candidate has found the cut: that candidate, whose full key ends
// the select without the remaining passes. member(i, v): the candidates the passes counted.
template <class M>
__device__ uint64_t unique_key(const Row &r, uint64_t prefix, uint64_t mask, M member, Shared &sh, Cl &c) {
  long long id = LLONG_MAX;
  for (int64_t i = c.g; i < r.V; i += c.G) {
    const double v = r.w[i];
    if (member(i, v) && (key_of(v) & mask) == prefix) id = min(id, (long long)i);
  }
  id = cl_min_l(id, sh, c);
  return id == LLONG_MAX ? prefix : key_of(r.w[id]);  // (none: cannot happen, the count said one)
}

// Top-k's digit at this pass, by warp 0: bins are walked from 255 down, eight per lane (lane l: 255 - 8l
// down to 248 - 8l); the first bin b >= 1 where the count of bins above plus its own reaches rem, else bin 0.
// The sequential rule it replaces: for (b = 255; b > 0 && cnt[b] < rem; b--) rem -= cnt[b].
__device__ void select_topk_bin(Shared &sh, long long rem) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  long long mine = 0;
  for (int j = 0; j < 8; j++) mine += sh.tot_cnt[255 - 8 * lane - j];
  long long incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const long long n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  long long run = incl - mine;  // bins above this lane's first
  int hit = -1;
  long long hit_rem = 0;
  for (int j = 0; j < 8; j++) {
    const int b = 255 - 8 * lane - j;
    const long long n = sh.tot_cnt[b];
    if (b == 0 || run + n >= rem) {
      hit = b;
      hit_rem = rem - run;
      break;
    }
    run += n;
  }
  const unsigned hits = __ballot_sync(0xffffffffu, hit >= 0);  // lane 31 always hits (bin 0)
  if (lane == __ffs(hits) - 1) {
    sh.digit = hit;
    sh.rem = hit_rem;
  }
}

// Top-p's digit at this pass, by warp 0, walking bins from 255 down as select_topk_bin does: the first non-empty
// bin where the mass above it (above + bins above) plus its own reaches p. When none does below the first
// level (sums in another order may leave the parts of the bucket that reached p a rounding short), the
// lowest non-empty bin, with the mass above it. found = 0: rounding left the total below p.
__device__ void select_topp_bin(Shared &sh, double above, double p, bool first_level) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  double mine = 0;
  for (int j = 0; j < 8; j++) mine += sh.tot_mass[255 - 8 * lane - j];
  double incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  double run = above + (incl - mine);
  int hit = -1, lowest = -1;
  double hit_above = 0, lowest_above = 0;
  for (int j = 0; j < 8; j++) {
    const int b = 255 - 8 * lane - j;
    if (sh.tot_cnt[b] == 0) continue;
    const double m = sh.tot_mass[b];
    if (run + m >= p) {
      hit = b;
      hit_above = run;
      break;
    }
    lowest = b;
    lowest_above = run;
    run += m;
  }
  const unsigned hits = __ballot_sync(0xffffffffu, hit >= 0);
  const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
  if (hits) {
    if (lane == __ffs(hits) - 1) sh.found = 1, sh.digit = hit, sh.mass_above = hit_above;
  } else if (!first_level && nonempty) {
    if (lane == 31 - __clz(nonempty)) sh.found = 1, sh.digit = lowest, sh.mass_above = lowest_above;
  } else if (lane == 0) {
    sh.found = 0;
  }
}

__device__ void sample_row(const float *logits, int64_t V, const char *params, int32_t n_rows, int32_t row_index,
                           double *work, int32_t *tokens, int32_t *flags, Shared &sh, Cl &c) {
  const SampleRowParams *rows = reinterpret_cast<const SampleRowParams *>(params);
  const SampleRowParams P = rows[row_index];
  const SampleAdjust *adj = reinterpret_cast<const SampleAdjust *>(params + int64_t(n_rows) * sizeof(SampleRowParams));
  const float *bias = reinterpret_cast<const float *>(params + P.bias_at);
  const float *x = logits + int64_t(P.row) * V;
  double *w = work + int64_t(row_index) * V;
  double *q = work + (int64_t(n_rows) + row_index) * V;  // a candidate's probability q_i = e_i / z, from (5) on
  const int tid = threadIdx.x;
  const int64_t g = c.g, G = c.G;
  auto done = [&](int32_t tok, int32_t flag) {
    if (g == 0) {
      tokens[row_index] = tok;
      flags[row_index] = flag;
    }
  };

  // (1) raw logits: a NaN or +inf is the sampler's error
  long long bad = 0;
  for (int64_t i = g; i < V; i += G) {
    const float v = x[i];
    bad |= !(v < INFINITY);
    w[i] = canon(double(v));
  }
  c.cl.sync();  // (2) rewrites ids another block wrote
  // (2) bias, penalties, bans (each touched id once, so no two threads write one element)
  for (int64_t a = g; a < P.n_adj; a += G) {
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
  // (2b) bans (a banned touched id was made -inf above too: both writes agree)
  const int32_t *bans = reinterpret_cast<const int32_t *>(params + P.bans_at) + P.ban0;
  for (int64_t j = g; j < P.n_ban; j += G)
    if (bans[j] >= 0 && bans[j] < V) w[bans[j]] = -INFINITY;
  if (cl_max_l(bad, sh, c)) return done(-1, 1);  // (its cluster barrier: the adjusted values are visible below)

  // (3) the first id of the largest value
  double bv = -INFINITY;
  long long bi = -1;
  for (int64_t i = g; i < V; i += G) {
    const double v = w[i];
    if (v > bv) bv = v, bi = i;  // strided ids ascend per thread: the first of equal values stays
  }
  const Pair best = cl_argmax(bv, bi, sh, c);
  bv = best.v;
  bi = best.i;
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
      for (int64_t i = g; i < V; i += G) {
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
      cluster_histogram(sh, c, false);
      select_topk_bin(sh, rem);
      __syncthreads();
      prefix |= uint64_t(sh.digit) << shift;
      mask |= uint64_t(0xff) << shift;
      rem = sh.rem;
      const bool one = sh.tot_cnt[sh.digit] == 1;  // then rem == 1: the cut is that id
      __syncthreads();
      if (one && shift > 0) {
        prefix = unique_key(r, prefix, mask, [](int64_t, double) { return true; }, sh, c);
        break;
      }
    }
    const double cv = value_of(prefix);
    const long long id = nth_equal_id(r, cv, rem, sh, c);
    r.cut_v = cv;
    r.cut_id = id;
  }

  // (5) the normaliser over the candidates (q_i = e_i / z, as the CPU). Each candidate's q is computed once
  // here and read by the passes below.
  double zp = 0;
  for (int64_t i = g; i < V; i += G) {
    const double v = w[i];
    if (r.cand(i, v)) zp += (q[i] = exp((v - mx) / T));
  }
  const double z = cl_sum_d(zp, sh, c);
  for (int64_t i = g; i < V; i += G)
    if (r.cand(i, w[i])) q[i] = q[i] / z;
  c.cl.sync();  // (8) reads q in contiguous chunks, written by other threads and blocks in this loop's stride

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
      for (int64_t i = g; i < V; i += G) {
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
      cluster_histogram(sh, c, true);
      select_topp_bin(sh, above, p, shift == 56);
      __syncthreads();
      found = sh.found;
      above = sh.mass_above;
      if (!found) break;  // rounding left the total below top_p: the CPU keeps every candidate
      prefix |= uint64_t(sh.digit) << shift;
      mask |= uint64_t(0xff) << shift;
      const bool one = sh.tot_cnt[sh.digit] == 1;
      __syncthreads();
      if (one && shift > 0) {
        prefix = unique_key(r, prefix, mask, [&r](int64_t i, double v) { return r.cand(i, v); }, sh, c);
        break;
      }
    }
    if (found) {
      const double pv = value_of(prefix);
      long long group = 0;  // candidates of that value
      for (int64_t i = g; i < V; i += G) group += (w[i] == pv && r.cand(i, w[i])) ? 1 : 0;
      group = cl_sum_l(group, sh, c);
      const double qv = exp((pv - mx) / T) / z;
      long long j = 1;  // the CPU's running sum goes on id by id through the tied group: at least one is kept
      double acc = above + qv;
      while (acc < p && j < group) acc += qv, j++;
      const long long id = nth_equal_id(r, pv, j, sh, c);
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
  for (int64_t i = g; i < V; i += G) {
    double qi;
    if (kept(i, w[i], qi)) zkp += qi;
  }
  const double zk = cl_sum_d(zkp, sh, c);
  const int64_t chunk = (V + G - 1) / G;
  const int64_t lo = min(g * chunk, V), hi = min(lo + chunk, V);
  double s = 0;
  long long last = -1;
  for (int64_t i = lo; i < hi; i++) {  // (ids whose probability underflowed to 0 are skipped, as the CPU skips them)
    double qi;
    if (!kept(i, w[i], qi) || !(qi / zk > 0)) continue;
    s += qi / zk;
    last = i;
  }
  const double incl = cl_inclusive_scan(s, sh.red_d, sh.part_d, c);
  const long long owner = cl_min_l(last >= 0 && P.u < incl ? g : G, sh, c);
  const long long last_all = cl_max_l(last, sh, c);
  if (owner == G) return done(int32_t(last_all), 0);  // rounding left u past the total: the last kept id
  if (g == owner) {
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
    tokens[row_index] = int32_t(tok);
    flags[row_index] = 0;
  }
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float *logits, int64_t V, const char *params,
                                                          int32_t n_rows, double *work, int32_t *tokens,
                                                          int32_t *flags) {
  __shared__ Shared sh;
  Cl c{cg::this_cluster(), 0, 0, 0, 0, 0};
  c.rank = int(c.cl.block_rank());
  c.C = int(c.cl.num_blocks());
  c.g = int64_t(c.rank) * kThreads + threadIdx.x;
  c.G = int64_t(c.C) * kThreads;
  sample_row(logits, V, params, n_rows, int32_t(blockIdx.x / unsigned(c.C)), work, tokens, flags, sh, c);
  c.cl.sync();  // no block leaves while another may still read its shared memory
}

}  // namespace

// Per row: the adjusted values and the candidates' probabilities, V doubles each.
int64_t sample_workspace_bytes(int64_t n_rows, int64_t vocab) { return 2 * n_rows * vocab * int64_t(sizeof(double)); }

void sample_rows(const float *logits, int64_t vocab, const void *params, int32_t n_rows, void *workspace, int32_t *tokens,
                 int32_t *flags, cudaStream_t s) {
  static_assert(sizeof(SampleRowParams) == 64 && sizeof(SampleAdjust) == 20, "the parameter block's layout");
  if (n_rows <= 0) return;
  // Blocks per row: as many as keep the launch within about one wave of the GPU's SMs (a block of 1024 threads
  // fills an SM), at most kMaxCluster; 1 from 66 rows on (each row then has an SM to itself anyway).
  const int n_sm = sm_count();
  int C = kMaxCluster;
  while (C > 1 && int64_t(C) * n_rows > n_sm) C /= 2;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(n_rows) * unsigned(C));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, sample_kernel, logits, vocab, static_cast<const char *>(params), n_rows,
                                           static_cast<double *>(workspace), tokens, flags);
  if (e != cudaSuccess) throw std::runtime_error(std::string("sample_rows: ") + cudaGetErrorString(e));
  check_launch("sample_rows");
}

}  // namespace dsrt::kernels
