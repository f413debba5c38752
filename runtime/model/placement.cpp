#include "model/placement.h"

#include <algorithm>
#include <cstdio>

#include "core/status.h"

namespace dsrt {
namespace {

uint64_t bytes_of(const Weight &w) {
  if (!w) return 0;
  uint64_t b = uint64_t(w.rows * w.cols) * dtype_size(w.dtype);
  if (w.dtype == DType::F8_E4M3) b += uint64_t(((w.rows + 127) / 128) * w.scale_cols) * sizeof(float);
  return b;
}

std::string mib(uint64_t b) { return std::to_string((b + (1 << 20) - 1) >> 20) + " MiB"; }

}  // namespace

Placement Placement::plan(const ModelWeights &w, const std::vector<Device> &devices, uint64_t budget, uint64_t kv_pool) {
  Placement p;
  p.where.assign(w.all.size(), -1);
  // The parts, from the model's structure (not from tensor names): routed experts, MTP layers, the rest.
  std::vector<char> expert(w.all.size(), 0), mtp(w.all.size(), 0);
  auto mark = [&](const Weight &x, std::vector<char> &v) {
    if (x && x.id >= 0) v[size_t(x.id)] = 1;
  };
  for (const LayerWeights &L : w.layers)
    for (const FfnWeights &e : L.experts) {
      mark(e.gate, expert);
      mark(e.up, expert);
      mark(e.down, expert);
    }
  uint64_t non_expert = 0, experts = 0, mtp_bytes = 0;
  // MTP weights: everything bound in the MTP layers (counted apart; they are uploaded only with drafts on).
  for (const LayerWeights &L : w.mtp) for_each_weight(L, [&](const Weight &x) { mark(x, mtp); });
  p.part.assign(w.all.size(), Part::NonExpert);
  for (const Weight *x : w.all) {
    if (x->id < 0) continue;
    const uint64_t b = bytes_of(*x);
    Part &pt = p.part[size_t(x->id)];
    if (mtp[size_t(x->id)]) {
      mtp_bytes += b;
      pt = Part::Mtp;
    } else if (expert[size_t(x->id)]) {
      experts += b;
      pt = Part::RoutedExpert;
    } else {
      non_expert += b;
    }
  }
  if (devices.empty()) {
    p.host_bytes = non_expert + experts + mtp_bytes;
    return p;
  }
  if (devices.size() > 1)
    fail(DSRT_ERR_UNSUPPORTED, "weights over several devices come with the several-GPU communicator; give one device");
  if (non_expert > budget || kv_pool > budget - non_expert) {
    const std::string kv = kv_pool ? " and the KV pool " + mib(kv_pool) + " (" + mib(non_expert + kv_pool) + " in all)" : "";
    failf(DSRT_ERR_OUT_OF_MEMORY, "the non-expert weights need ", mib(non_expert), kv, " of ", devices[0].str(),
          " memory, but the budget is ", mib(budget));
  }
  DeviceShare d;
  d.device = devices[0];
  d.budget = budget;
  d.kv_pool = kv_pool;
  d.non_expert = non_expert;
  d.mtp = mtp_bytes;
  for (const Weight *x : w.all)
    if (x->id >= 0 && p.part[size_t(x->id)] != Part::RoutedExpert) p.where[size_t(x->id)] = 0;
  // Routed experts fill what the budget leaves, whole experts, taken round robin over the layers (expert 0 of
  // every layer, then expert 1, ...) so that each layer keeps the same share on the device; the others stay
  // in host memory, read in place from the mapped shards (expert offload).
  uint64_t left = budget - non_expert - kv_pool;
  size_t most = 0;
  for (const LayerWeights &L : w.layers) most = std::max(most, L.experts.size());
  for (size_t j = 0; j < most; j++)
    for (const LayerWeights &L : w.layers) {
      if (j >= L.experts.size()) continue;
      const FfnWeights &e = L.experts[j];
      const uint64_t b = bytes_of(e.gate) + bytes_of(e.up) + bytes_of(e.down);
      const bool fits = b <= left;
      if (fits) left -= b;
      for (const Weight *x : {&e.gate, &e.up, &e.down}) {
        if (!*x || x->id < 0) continue;
        if (fits) {
          p.where[size_t(x->id)] = 0;
          d.routed_experts += bytes_of(*x);
          d.experts_on_device += x == &e.gate;
        } else {
          p.host_bytes += bytes_of(*x);
          p.experts_in_host += x == &e.gate;
        }
      }
    }
  p.devices.push_back(d);
  return p;
}

std::string Placement::str() const {
  std::string s;
  char line[256];
  std::snprintf(line, sizeof line, "%-8s %14s %14s %14s %14s\n", "where", "budget", "non-expert", "routed experts", "MTP");
  s += line;
  for (const DeviceShare &d : devices) {
    std::snprintf(line, sizeof line, "%-8s %14s %14s %14s %14s\n", d.device.str().c_str(), mib(d.budget).c_str(),
                  mib(d.non_expert).c_str(), mib(d.routed_experts).c_str(), mib(d.mtp).c_str());
    s += line;
    if (d.kv_pool > 0) {
      std::snprintf(line, sizeof line, "%-8s %14s %44s\n", "", "", (mib(d.kv_pool) + " of the budget kept for the KV pool").c_str());
      s += line;
    }
  }
  if (devices.empty()) {
    std::snprintf(line, sizeof line, "%-8s %14s %44s\n", "host", "-", (mib(host_bytes) + " read in place from the mapped files").c_str());
    s += line;
  } else if (host_bytes > 0) {
    std::snprintf(line, sizeof line, "%-8s %14s %14s %14s   (%lld of %lld experts, read in place over PCIe)\n", "host", "-", "-",
                  mib(host_bytes).c_str(), (long long)experts_in_host,
                  (long long)(experts_in_host + devices[0].experts_on_device));
    s += line;
  }
  return s;
}

}  // namespace dsrt
