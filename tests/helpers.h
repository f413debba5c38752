// Shared test helpers: temporary directories, tiny checkpoints made once per process, C API wrappers.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "dsrt.h"
#include "tiny_model.h"

namespace testing {

namespace fs = std::filesystem;

// A directory under the system temp dir, removed at exit.
inline fs::path temp_root() {
  static struct Root {
    fs::path p;
    Root() {
      std::string tmpl = (fs::temp_directory_path() / "dsrt-test-XXXXXX").string();
      p = mkdtemp(tmpl.data());
    }
    ~Root() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } root;
  return root.p;
}

inline fs::path fresh_dir(const std::string &name) {
  static int n = 0;
  fs::path d = temp_root() / (name + "-" + std::to_string(n++));
  fs::create_directories(d);
  return d;
}

// A file's bytes (the file must exist) / a file written with these bytes.
inline std::string slurp(const fs::path &p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "missing " << p.string());
  return std::string(std::istreambuf_iterator<char>(f), {});
}
inline void spit(const fs::path &p, const std::string &s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
  REQUIRE(f.good());
}

// The preset's checkpoint with seed 1 (the seed the reference data was made with), written once.
// A shell command's exit status, stdout and stderr (the CLI suites run the dsrt binary through it).
struct ShellRun {
  int code;
  std::string out, err;
};
inline ShellRun run_shell(const std::string &cmd_line) {
  const fs::path err = fresh_dir("shell") / "stderr.txt";
  const std::string cmd = cmd_line + " 2>" + err.string();
  FILE *p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WEXITSTATUS(status), out, slurp(err)};
}

inline std::string tiny(const std::string &preset) {
  static std::map<std::string, std::string> made;
  auto it = made.find(preset);
  if (it != made.end()) return it->second;
  const auto *p = dsrt::tools::find_tiny_preset(preset);
  REQUIRE(p != nullptr);
  fs::path d = temp_root() / ("tiny-" + preset);
  dsrt::tools::make_tiny_model(*p, d.string(), 1);
  return made[preset] = d.string();
}

// A fresh copy of a tiny preset's checkpoint, to damage.
inline fs::path copy_of(const std::string &preset = "no-qlora", const std::string &dir = "copy") {
  fs::path d = fresh_dir(dir);
  for (auto &e : fs::directory_iterator(tiny(preset))) fs::copy_file(e.path(), d / e.path().filename());
  return d;
}

inline std::vector<std::string> preset_names() {
  std::vector<std::string> v;
  for (auto &p : dsrt::tools::tiny_presets())
    if (!p.bulk) v.push_back(p.name);  // the benchmark presets are gigabytes
  return v;
}

#define CHECK_OK(expr)                                                                    \
  do {                                                                                    \
    dsrt_status _s = (expr);                                                              \
    INFO(#expr, " -> ", dsrt_status_string(_s), ": ", dsrt_last_error());                 \
    REQUIRE(_s == DSRT_OK);                                                               \
  } while (0)

struct Model {
  dsrt_model *m = nullptr;
  // backend: DSRT_BACKEND_* (the GPU suite loads on CUDA); -1: the params' default.
  explicit Model(const std::string &dir, int threads = 2, int32_t backend = -1) {
    dsrt_model_params p;
    dsrt_model_params_init(&p, sizeof p);
    p.n_threads = threads;
    if (backend >= 0) p.backend = backend;
    CHECK_OK(dsrt_model_load(dir.c_str(), &p, &m));
  }
  ~Model() { dsrt_model_free(m); }
  int32_t vocab() const {
    dsrt_model_info i;
    i.struct_size = sizeof i;
    dsrt_model_info_get(m, &i);
    return i.n_vocab;
  }
};

struct Engine {
  dsrt_engine *e = nullptr;
  Engine(Model &m, int32_t attention = DSRT_ATTENTION_AUTO, int32_t max_batch = 512, int32_t max_tokens = 0,
         int32_t precision = DSRT_PRECISION_AUTO) {
    dsrt_engine_params p;
    dsrt_engine_params_init(&p, sizeof p);
    p.attention = attention;
    p.max_batch_tokens = max_batch;
    p.max_tokens = max_tokens;
    p.precision = precision;
    CHECK_OK(dsrt_engine_create(m.m, &p, &e));
  }
  ~Engine() { dsrt_engine_free(e); }
};

struct Session {
  dsrt_session *s = nullptr;
  explicit Session(Engine &e, bool logits_all = false, uint64_t seed = 0, int32_t max_ctx = 0) {
    dsrt_session_params p;
    dsrt_session_params_init(&p, sizeof p);
    p.logits_all = logits_all ? 1 : 0;
    p.seed = seed;
    p.max_ctx = max_ctx;
    CHECK_OK(dsrt_session_create(e.e, &p, &s));
  }
  ~Session() { dsrt_session_free(s); }
  void append(const std::vector<int32_t> &t) { CHECK_OK(dsrt_session_append_tokens(s, t.data(), t.size())); }
  void eval() { CHECK_OK(dsrt_session_eval(s, nullptr)); }
  std::vector<float> logits(size_t *rows = nullptr) {
    const float *l;
    size_t r, v;
    CHECK_OK(dsrt_session_logits(s, &l, &r, &v));
    if (rows) *rows = r;
    return std::vector<float>(l, l + r * v);
  }
  int32_t greedy() {
    int32_t t;
    CHECK_OK(dsrt_session_sample(s, nullptr, &t));
    return t;
  }
};

inline std::vector<int32_t> prompt_tokens(int32_t vocab, int n) {
  // The reference script's prompt (tools/reference/hf_reference.py).
  std::vector<int32_t> t{0};
  for (int i = 1; i < n; i++) t.push_back(int32_t((int64_t(i) * 7919 + 13) % vocab));
  return t;
}

// ||a - b|| / ||b||, b the reference (float or double)
template <class Ref>
double rel_l2(const float *a, const Ref *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// One generation turn pulled through the C API.
struct Turn {
  std::vector<int32_t> tokens;
  std::string text;
  int32_t finish = 0;
};

inline Turn pull(dsrt_session *s, const dsrt_gen_params *p) {
  Turn t;
  CHECK_OK(dsrt_session_start(s, p));
  for (int guard = 0; guard < 10000; guard++) {
    dsrt_event ev;
    ev.struct_size = sizeof ev;
    CHECK_OK(dsrt_session_next(s, &ev));
    t.text.append(ev.text, ev.text_len);
    if (ev.token >= 0) t.tokens.push_back(ev.token);
    if (ev.type == DSRT_EVENT_DONE) {
      t.finish = ev.finish_reason;
      break;
    }
  }
  return t;
}

// A model loaded on the CPU (2 threads) and an engine on it with params p (the split tests' setup).
struct Loaded {
  dsrt_model *m = nullptr;
  dsrt_engine *e = nullptr;
  ~Loaded() {
    dsrt_engine_free(e);
    dsrt_model_free(m);
  }
};
inline dsrt_status load_cpu(Loaded &l, const std::string &dir, const dsrt_engine_params &p) {
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.backend = DSRT_BACKEND_CPU;
  mp.n_threads = 2;
  if (dsrt_status s = dsrt_model_load(dir.c_str(), &mp, &l.m); s != DSRT_OK) return s;
  return dsrt_engine_create(l.m, &p, &l.e);
}

// The logits of every position of `prompt`, evaluated in a fresh session of e.
inline std::vector<float> prompt_logits(dsrt_engine *e, const std::vector<int32_t> &prompt) {
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  sp.logits_all = 1;
  dsrt_session *s = nullptr;
  CHECK_OK(dsrt_session_create(e, &sp, &s));
  CHECK_OK(dsrt_session_append_tokens(s, prompt.data(), prompt.size()));
  CHECK_OK(dsrt_session_eval(s, nullptr));
  const float *lg;
  size_t rows, vocab;
  CHECK_OK(dsrt_session_logits(s, &lg, &rows, &vocab));
  std::vector<float> out(lg, lg + rows * vocab);
  dsrt_session_free(s);
  return out;
}

inline dsrt_gen_params greedy_params(Model &m, int n) {
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m.m);
  p.temperature = 0;
  p.max_new_tokens = n;
  return p;
}

}  // namespace testing
