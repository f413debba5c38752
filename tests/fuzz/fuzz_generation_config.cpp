// generation_config.json.
#include "fuzz_common.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  const auto dir = fuzz::workdir() / "genconf";
  fuzz::fs::create_directories(dir);
  fuzz::write_file(dir / "generation_config.json", data, n);
  try {
    dsrt::GenerationDefaults g;
    dsrt::load_generation_defaults(dir.string(), g);
  } catch (const dsrt::Error &) {
  }
  return 0;
}
