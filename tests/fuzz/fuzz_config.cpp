// config.json: types, missing fields, inconsistent values, rope variants; then the derived tables.
#include "fuzz_common.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  try {
    dsrt::ModelConfig c = dsrt::parse_model_config(std::string(reinterpret_cast<const char *>(data), n), "config.json");
    (void)c.softmax_scale();
    (void)c.rope_attention_factor();
    (void)c.rope_inv_freq();
  } catch (const dsrt::Error &) {
  }
  return 0;
}
