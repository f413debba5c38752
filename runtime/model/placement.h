// Where each weight lives (design.md §5): a plan made at load from the devices and their memory budgets.
// One device holds the non-expert weights and as many routed experts as its budget allows (expert offload:
// the rest stay in host memory); the CPU reads everything in place from the mapped files. Several GPUs (shards
// per rank) come with the several-GPU communicator.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/weights.h"

namespace dsrt {

// Where the routed experts left in host memory are computed (expert offload on a GPU; dsrt.h's DSRT_EXPERTS_*).
enum class ExpertCompute : uint8_t { Gpu, ColdOnCpu, AllOnCpu };

struct Placement {
  struct DeviceShare {
    Device device;
    uint64_t budget = 0;  // bytes the weights and the KV pool's reserve may take there
    uint64_t kv_pool = 0;  // bytes reserved for an engine's KV pool (0: none, the pool takes what is free)
    uint64_t non_expert = 0, routed_experts = 0, mtp = 0;  // bytes placed there, by part
    int64_t experts_on_device = 0;                          // routed experts (gate, up, down) placed there
  };
  enum class Part : uint8_t { NonExpert, RoutedExpert, Mtp };
  std::vector<DeviceShare> devices;  // empty: host memory only
  std::vector<int16_t> where;        // per Weight::id: index into devices, -1 = host memory (read in place)
  std::vector<Part> part;            // per Weight::id, from the model's structure
  uint64_t host_bytes = 0;       // bytes left in host memory (all of them without devices)
  int64_t experts_in_host = 0;   // routed experts left in host memory (expert offload)

  // devices empty: everything in host memory. One device: the non-expert weights there (MTP's too, outside
  // the budget: they are uploaded only with drafts on) and kv_pool bytes kept for an engine's KV pool
  // (model.h, plan_placement), then as many whole routed experts as the rest of the budget holds, round robin
  // over the layers; the others stay in host memory (where = -1) and the GPU reads them in place. Throws
  // DSRT_ERR_OUT_OF_MEMORY naming the bytes needed when the budget cannot hold the non-expert weights and the
  // KV pool; DSRT_ERR_UNSUPPORTED for several devices.
  static Placement plan(const ModelWeights &w, const std::vector<Device> &devices, uint64_t budget,
                        uint64_t kv_pool = 0);
  // A table for `dsrt inspect --placement`.
  std::string str() const;
};

}  // namespace dsrt
