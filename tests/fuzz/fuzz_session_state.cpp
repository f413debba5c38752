// Session state blobs handed to dsrt_session_state_load: truncations, sizes, ids, fingerprints. An
// accepted blob must leave a session that can still generate.
#include "dsrt.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static dsrt_model *m = nullptr;
  static dsrt_engine *e = nullptr;
  static std::string seed_path;
  if (!m) {
    dsrt_model_params p;
    dsrt_model_params_init(&p, sizeof p);
    p.n_threads = 1;
    if (dsrt_model_load(fuzz::tiny_model().c_str(), &p, &m) != DSRT_OK || dsrt_engine_create(m, nullptr, &e) != DSRT_OK)
      std::abort();
  }
  dsrt_session *s = nullptr;
  if (dsrt_session_create(e, nullptr, &s) != DSRT_OK) std::abort();
  if (dsrt_session_state_load(s, data, n) == DSRT_OK) {
    const int32_t t = 3;
    if (dsrt_session_append_tokens(s, &t, 1) == DSRT_OK) dsrt_session_eval(s, nullptr);
  }
  dsrt_session_free(s);
  return 0;
}
