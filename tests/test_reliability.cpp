// Endurance and failure: 10 000 session cycles with flat resident memory, a context that fills up,
// injected host allocation failures during load and generation (DSRT_ERR_OUT_OF_MEMORY, then everything
// still usable), API misuse on live objects.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "core/fault.h"
#include "helpers.h"

using namespace testing;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

double rss_mb() {
  std::ifstream f("/proc/self/statm");
  long pages = 0, resident = 0;
  f >> pages >> resident;
  return double(resident) * double(sysconf(_SC_PAGESIZE)) / 1e6;
}

std::vector<int32_t> generate(dsrt_session *s, int n, int32_t *finish = nullptr, dsrt_status *st_out = nullptr) {
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, nullptr);
  p.max_new_tokens = n;
  p.ignore_eos = 1;
  std::vector<int32_t> out;
  dsrt_status st = dsrt_session_start(s, &p);
  while (st == DSRT_OK) {
    dsrt_event ev;
    ev.struct_size = sizeof ev;
    st = dsrt_session_next(s, &ev);
    if (st != DSRT_OK) break;
    if (ev.token >= 0) out.push_back(ev.token);
    if (ev.type == DSRT_EVENT_DONE) {
      if (finish) *finish = ev.finish_reason;
      if (ev.finish_reason == DSRT_FINISH_ERROR) st = ev.status;
      break;
    }
  }
  if (st_out) *st_out = st;
  return out;
}

}  // namespace

TEST_CASE("10 000 session create/generate/free cycles keep resident memory flat") {
  Model m(tiny("no-qlora"), 1);
  Engine e(m);
  const char *env = std::getenv("DSRT_ENDURANCE_CYCLES");
  const int cycles = env ? std::atoi(env) : 10000;
  const int32_t prompt[] = {0, 5, 17, 42};
  double warm = 0;
  for (int i = 0; i < cycles; i++) {
    dsrt_session *s = nullptr;
    REQUIRE(dsrt_session_create(e.e, nullptr, &s) == DSRT_OK);
    REQUIRE(dsrt_session_append_tokens(s, prompt, 4) == DSRT_OK);
    REQUIRE(generate(s, 2).size() == 2);
    dsrt_session_free(s);
    if (i == std::min(500, cycles / 2)) warm = rss_mb();
  }
  const double end = rss_mb();
  dsrt_engine_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_engine_stats_get(e.e, &st));
  CHECK(st.n_sessions == 0);
  CHECK(st.kv_pages_used == 0);
  MESSAGE(cycles << " cycles: resident " << warm << " MB after warm-up, " << end << " MB at the end");
  if (!kSanitized) CHECK(end - warm < 8.0);  // sanitizers keep freed memory in quarantine
}

TEST_CASE("a context that fills up ends the turn as context full") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session s(e, false, 0, 20);
  s.append({0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  int32_t finish = 0;
  auto toks = generate(s.s, 0, &finish);
  CHECK(finish == DSRT_FINISH_CONTEXT_FULL);
  CHECK(toks.size() == 10);
  dsrt_session_stats st;
  st.struct_size = sizeof st;
  CHECK_OK(dsrt_session_stats_get(s.s, &st));
  CHECK(st.n_tokens + st.n_pending == 20);
}

TEST_CASE("allocation failures during load return out-of-memory and leave nothing broken") {
  const std::string dir = tiny("v3-mini");
  dsrt::fault::arm_alloc_failure(int64_t(1) << 40);  // count the allocation points of a clean load
  {
    Model m(dir);
  }
  const int64_t points = dsrt::fault::allocations_seen();
  dsrt::fault::disarm();
  REQUIRE(points > 0);
  int oom = 0;
  for (int64_t k = 0; k < points; k++) {
    dsrt::fault::arm_alloc_failure(k);
    dsrt_model *m = nullptr;
    dsrt_status st = dsrt_model_load(dir.c_str(), nullptr, &m);
    dsrt::fault::disarm();
    CHECK((st == DSRT_OK || st == DSRT_ERR_OUT_OF_MEMORY));
    if (st == DSRT_ERR_OUT_OF_MEMORY) {
      oom++;
      CHECK(m == nullptr);
      CHECK(std::string(dsrt_last_error()).find("memory") != std::string::npos);
    }
    dsrt_model_free(m);
  }
  MESSAGE(points << " allocation points in a load; " << oom << " injected failures returned DSRT_ERR_OUT_OF_MEMORY");
  CHECK(oom > 0);
  Model ok(dir);
  CHECK(ok.vocab() == 2048);
}

TEST_CASE("allocation failures during generation: out-of-memory for that turn, other sessions unaffected") {
  Model m(tiny("partial-yarn"));
  std::vector<int32_t> want_a;
  {  // the reference: A alone, without failures
    Engine e(m);
    Session a(e);
    a.append({0, 5, 17, 42});
    want_a = generate(a.s, 16);
  }
  int oom = 0;
  for (int64_t k = 0; k < 40; k += 3) {
    Engine e(m);  // a fresh engine: its first steps allocate scratch, pages and logits
    Session a(e), b(e);
    a.append({0, 5, 17, 42});
    auto first = generate(a.s, 8);  // A is mid-conversation
    b.append(prompt_tokens(m.vocab(), 70));
    dsrt::fault::arm_alloc_failure(k);
    dsrt_status st = DSRT_OK;
    generate(b.s, 4, nullptr, &st);
    dsrt::fault::disarm();
    CHECK((st == DSRT_OK || st == DSRT_ERR_OUT_OF_MEMORY));
    oom += st == DSRT_ERR_OUT_OF_MEMORY;
    // A continues exactly as if nothing had happened; B can start over.
    auto rest = generate(a.s, 8);
    first.insert(first.end(), rest.begin(), rest.end());
    CHECK(first == want_a);
    CHECK_OK(dsrt_session_reset(b.s));
    b.append({0, 5, 17, 42});
    CHECK(generate(b.s, 16) == want_a);
  }
  MESSAGE(oom << " injected failures during generation returned DSRT_ERR_OUT_OF_MEMORY");
  CHECK(oom > 0);
}

TEST_CASE("misuse on live objects: calls out of order, bad ids, a turn started twice") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session s(e);
  dsrt_event ev;
  ev.struct_size = sizeof ev;
  CHECK(dsrt_session_next(s.s, &ev) == DSRT_ERR_BAD_STATE);  // no turn
  CHECK(dsrt_session_start(s.s, nullptr) == DSRT_ERR_BAD_STATE);  // nothing to generate from
  s.append({1, 2, 3});
  CHECK_OK(dsrt_session_start(s.s, nullptr));
  void *blob;
  size_t n;
  CHECK(dsrt_session_state_save(s.s, &blob, &n) == DSRT_ERR_BAD_STATE);  // mid-turn
  ev.struct_size = 0;
  CHECK(dsrt_session_next(s.s, &ev) == DSRT_ERR_INVALID_ARGUMENT);
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m.m);
  p.top_p = 2.0f;
  CHECK(dsrt_session_start(s.s, &p) == DSRT_ERR_INVALID_ARGUMENT);
  p.top_p = 1.0f;
  p.n_stop_strings = 3;  // with a NULL array
  CHECK(dsrt_session_start(s.s, &p) == DSRT_ERR_INVALID_ARGUMENT);
  int32_t neg = -1;
  CHECK(dsrt_session_append_tokens(s.s, &neg, 1) == DSRT_ERR_INVALID_ARGUMENT);
  char buf[8];
  size_t len;
  CHECK(dsrt_token_bytes(m.m, 1 << 30, buf, sizeof buf, &len) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_append_chat(s.s, "{\"role\": 5}", nullptr, 0) == DSRT_ERR_INVALID_ARGUMENT);
  CHECK(dsrt_session_append_chat(s.s, "[1, 2]", nullptr, 0) == DSRT_ERR_INVALID_ARGUMENT);
}
