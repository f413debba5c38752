// model.safetensors.index.json beside the tiny model's real shards: weight maps naming missing or foreign
// files, paths, types; then the binding of every tensor the config implies.
#include "fuzz_common.h"
#include "model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static const fuzz::fs::path dir = [] {
    auto d = fuzz::workdir() / "index";
    fuzz::fs::create_directories(d);
    for (auto &e : fuzz::fs::directory_iterator(fuzz::tiny_model()))
      if (e.path().extension() == ".safetensors" || e.path().filename() == "config.json")
        fuzz::fs::copy_file(e.path(), d / e.path().filename(), fuzz::fs::copy_options::overwrite_existing);
    return d;
  }();
  fuzz::write_file(dir / "model.safetensors.index.json", data, n);
  try {
    dsrt::LoadOptions lo;
    lo.validate_scales = false;
    dsrt::Model::load(dir.string(), lo);
  } catch (const dsrt::Error &) {
  }
  return 0;
}
