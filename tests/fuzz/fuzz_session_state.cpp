// Session state blobs handed to dsrt_session_state_load: truncations, sizes, ids, values, JSON depth,
// fingerprints. Each input is loaded as given (it must pass the checksum: random bytes almost never do) and
// again with its size field and checksum rewritten, so mutations reach the parser behind the checksum. An
// accepted blob must leave a session that can still generate.
#include <cstring>
#include <string>

#include "core/hash.h"
#include "dsrt.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  static dsrt_model *m = nullptr;
  static dsrt_engine *e = nullptr;
  if (!m) {
    dsrt_model_params p;
    dsrt_model_params_init(&p, sizeof p);
    p.n_threads = 1;
    if (dsrt_model_load(fuzz::tiny_model().c_str(), &p, &m) != DSRT_OK || dsrt_engine_create(m, nullptr, &e) != DSRT_OK)
      std::abort();
  }
  auto one = [](const void *b, size_t len) {
    dsrt_session *s = nullptr;
    if (dsrt_session_create(e, nullptr, &s) != DSRT_OK) std::abort();
    if (dsrt_session_state_load(s, b, len) == DSRT_OK) {
      const int32_t t = 3;
      if (dsrt_session_append_tokens(s, &t, 1) == DSRT_OK) dsrt_session_eval(s, nullptr);
    }
    dsrt_session_free(s);
  };
  one(data, n);
  if (n >= 64) {  // format 2: u64 size at 16, u64 checksum of everything before it in the last 8 bytes
    std::string b(reinterpret_cast<const char *>(data), n);
    const uint64_t total = n;
    std::memcpy(b.data() + 16, &total, 8);
    const uint64_t sum = dsrt::hash64(b.data(), n - 8);
    std::memcpy(b.data() + n - 8, &sum, 8);
    one(b.data(), n);
  }
  return 0;
}
