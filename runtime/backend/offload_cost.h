// Where each routed expert a step needs is computed under expert offload (issue #11, design.md §5): on the GPU
// from its expert cache (a hit), on the GPU after a copy over PCIe, or on the CPU from the mapped checkpoint
// (cpu/host_experts.h), whichever the measured rates say finishes the layer sooner. Pure functions of plain data.
//
// The model: copies queue on the PCIe link (bytes / PCIe rate each), CPU experts queue on the host (one
// multi-threaded HostExperts run: a fixed cost for the run, then per expert the slower of streaming its weights
// at the CPU kernel's rate and its rows' arithmetic at the CPU's flop rate: decode is bandwidth-bound, a prefill
// chunk compute-bound). The two queues and the GPU's own work run side by side, so the layer takes the longest
// of the three. The GPU's arithmetic on a copied expert is left out: it reads a copy at HBM speed, ~80x faster
// than the copy arrived.
//
// Policy: hits stay on the GPU; misses, largest first (bytes, then rows), each go to the queue that would
// finish it sooner (ties to the copy, which may also fill the cache for later steps): no search, and close to the
// best split when the experts are alike, as a layer's are (one shape, a few rows each).
#pragma once
#include <cstdint>
#include <vector>

namespace dsrt::offload {

enum class Place : uint8_t { Hit, Copy, Cpu };

enum class CpuMode : uint8_t {
  Auto,   // the cost model decides each miss
  Never,  // every miss is copied (no CPU expert path)
  All,    // every routed expert on the CPU, cached or not (--experts-on-cpu, llama.cpp's -ot exps=CPU)
};

struct ExpertNeed {
  int64_t bytes = 0;         // the expert's weight bytes on the host: what a copy moves and the CPU streams
  int64_t rows = 0;          // token rows routed to it this step
  int64_t macs_per_row = 0;  // multiply-adds per row (3 H I for a SwiGLU expert)
  bool cached = false;       // resident in the GPU's expert cache
};

struct Rates {
  double pcie = 0;           // host-to-device bytes/s (measured); <= 0: no copies
  double cpu_bytes = 0;      // bytes/s of expert weights the CPU kernel streams (measured at one row); <= 0: no CPU
  double cpu_flops = 0;      // flop/s of the CPU kernel when compute-bound; <= 0: arithmetic not modelled
  double cpu_overhead = 0;   // seconds once per step with any CPU expert (waking the pool, adding the sum on the GPU)
  double gpu = 0;            // seconds of the GPU's own work on the layer (hits, shared expert...); 0: unknown
};

struct Plan {
  std::vector<Place> place;  // per need, in the order given
  double pcie_s = 0;         // the copy queue
  double cpu_s = 0;          // the CPU queue (cpu_overhead included when it is not empty)
  double step_s = 0;         // max(Rates::gpu, pcie_s, cpu_s)
};

double copy_seconds(const ExpertNeed &n, const Rates &r);
double cpu_seconds(const ExpertNeed &n, const Rates &r);  // without cpu_overhead

// A queue without its rate (<= 0) takes nothing; without both rates misses are copied and step_s is infinite.
Plan plan_experts(const std::vector<ExpertNeed> &needs, const Rates &r, CpuMode mode = CpuMode::Auto);

}  // namespace dsrt::offload
