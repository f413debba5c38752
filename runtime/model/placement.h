// Where each weight lives (design.md §5): a plan made at load from the devices and their memory budgets.
// Today one device holds everything (or the CPU reads everything in place from the mapped files); expert
// offload and several GPUs fill in the other cases (routed experts left in host memory, shards per rank).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/weights.h"

namespace dsrt {

struct Placement {
  struct DeviceShare {
    Device device;
    uint64_t budget = 0;  // bytes the weights may take there
    uint64_t non_expert = 0, routed_experts = 0, mtp = 0;  // bytes placed there, by part
  };
  enum class Part : uint8_t { NonExpert, RoutedExpert, Mtp };
  std::vector<DeviceShare> devices;  // empty: host memory only
  std::vector<int16_t> where;        // per Weight::id: index into devices, -1 = host memory (read in place)
  std::vector<Part> part;            // per Weight::id, from the model's structure
  uint64_t host_bytes = 0;

  // devices empty: everything in host memory. One device: everything there, within budget (bytes; the
  // caller passes what is free when the user gave none). Throws DSRT_ERR_OUT_OF_MEMORY naming the bytes
  // needed when the budget cannot hold the non-expert weights, or the whole model (expert offload is not
  // there yet); DSRT_ERR_UNSUPPORTED for several devices.
  static Placement plan(const ModelWeights &w, const std::vector<Device> &devices, uint64_t budget);
  // A table for `dsrt inspect --placement`.
  std::string str() const;
};

}  // namespace dsrt
