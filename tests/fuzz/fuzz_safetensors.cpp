// Safetensors shard headers: lengths, offsets, dtypes, shapes, duplicates, overlaps.
#include "fuzz_common.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const auto path = fuzz::workdir() / "shard.safetensors";
  fuzz::write_file(path, data, n);
  try {
    dsrt::SafetensorsFile f(path.string());
    uint64_t sum = 0;
    for (auto &t : f.tensors())  // every accepted tensor's bytes must be readable
      for (uint64_t i = 0; i < t.nbytes; i += 4096) sum += t.data[i];
    (void)sum;
  } catch (const dsrt::Error &) {
  }
  return 0;
}
