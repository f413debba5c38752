#include "backend/offload_cost.h"

#include <algorithm>
#include <limits>

namespace dsrt::offload {

namespace {
constexpr double kNever = std::numeric_limits<double>::infinity();
}

double copy_seconds(const ExpertNeed &n, const Rates &r) { return r.pcie > 0 ? double(n.bytes) / r.pcie : kNever; }

double cpu_seconds(const ExpertNeed &n, const Rates &r) {
  if (r.cpu_bytes <= 0) return kNever;
  const double stream = double(n.bytes) / r.cpu_bytes;
  return r.cpu_flops > 0 ? std::max(stream, 2.0 * double(n.macs_per_row) * double(n.rows) / r.cpu_flops) : stream;
}

Plan plan_experts(const std::vector<ExpertNeed> &needs, const Rates &r, CpuMode mode) {
  Plan p;
  p.place.assign(needs.size(), Place::Hit);
  bool cpu_used = false;
  auto cpu_done = [&](size_t i) { return p.cpu_s + cpu_seconds(needs[i], r) + (cpu_used ? 0.0 : r.cpu_overhead); };
  auto to_cpu = [&](size_t i) {
    p.cpu_s = cpu_done(i);
    p.place[i] = Place::Cpu;
    cpu_used = true;
  };
  std::vector<size_t> misses;
  for (size_t i = 0; i < needs.size(); i++) {
    if (mode == CpuMode::All)
      to_cpu(i);
    else if (!needs[i].cached)
      misses.push_back(i);
  }
  std::stable_sort(misses.begin(), misses.end(), [&](size_t a, size_t b) {
    return needs[a].bytes != needs[b].bytes ? needs[a].bytes > needs[b].bytes : needs[a].rows > needs[b].rows;
  });
  for (size_t i : misses) {
    const double copy_done = p.pcie_s + copy_seconds(needs[i], r);
    if (mode != CpuMode::Never && cpu_done(i) < copy_done) {
      to_cpu(i);
    } else {
      p.pcie_s = copy_done;
      p.place[i] = Place::Copy;
    }
  }
  p.step_s = std::max({r.gpu, p.pcie_s, p.cpu_s});
  return p;
}

}  // namespace dsrt::offload
