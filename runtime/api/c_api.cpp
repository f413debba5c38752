// The only file that turns C calls into C++ and back: handles, status codes, thread-local error text.
// Every export catches everything; no exception crosses the ABI.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "api/system_info.h"
#include "core/status.h"
#include "dsrt.h"
#include "engine/engine.h"
#include "model/model.h"

struct dsrt_cancel {
  std::atomic<int> flag{0};
};
struct dsrt_model {
  std::shared_ptr<const dsrt::Model> model;
  int32_t backend = DSRT_BACKEND_CPU;
  int32_t n_threads = 0;
};
struct dsrt_engine {
  std::shared_ptr<dsrt::Engine> engine;
  int32_t backend = DSRT_BACKEND_CPU;
};
struct dsrt_session {
  std::shared_ptr<dsrt::Session> session;
};

namespace {

thread_local std::string t_last_error;

dsrt_status set_error(dsrt_status code, const std::string &msg) {
  t_last_error = msg;
  return code;
}

// Runs fn, mapping every exception to a status and this thread's error text.
template <class F>
dsrt_status guarded(F &&fn) noexcept {
  try {
    t_last_error.clear();
    fn();
    return DSRT_OK;
  } catch (const dsrt::Error &e) {
    return set_error(e.code(), e.what());
  } catch (const std::bad_alloc &) {
    return set_error(DSRT_ERR_OUT_OF_MEMORY, "out of host memory");
  } catch (const std::exception &e) {
    return set_error(DSRT_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(DSRT_ERR_INTERNAL, "internal error: unknown exception");
  }
}

#define DSRT_REQUIRE(cond, what) \
  if (!(cond)) dsrt::fail(DSRT_ERR_INVALID_ARGUMENT, what)

// Reads a caller's params struct: the first struct_size bytes, defaults for the rest. A larger struct is
// accepted only if the fields this library does not know are zero.
template <class T>
T read_params(const T *p, void (*init)(T *, size_t), const char *what) {
  T out;
  init(&out, sizeof(T));
  if (!p) return out;
  const uint32_t n = p->struct_size;
  if (n < sizeof(uint32_t)) dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, what, ".struct_size is ", n, ": call its _init first");
  if (n > sizeof(T)) {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(p);
    for (size_t i = sizeof(T); i < n; i++)
      if (b[i]) dsrt::failf(DSRT_ERR_UNSUPPORTED, what, " has fields this library (", dsrt_version_string(), ") does not know");
  }
  std::memcpy(&out, p, std::min<size_t>(n, sizeof(T)));
  out.struct_size = sizeof(T);
  return out;
}

// Writes an output struct into the caller's, up to its struct_size.
template <class T>
void write_out(T *dst, T &src, const char *what) {
  DSRT_REQUIRE(dst, std::string(what) + " is NULL");
  const uint32_t n = dst->struct_size;
  if (n < sizeof(uint32_t)) dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, what, "->struct_size is ", n, ": set it to sizeof");
  src.struct_size = uint32_t(std::min<size_t>(n, sizeof(T)));
  std::memcpy(dst, &src, src.struct_size);
}

template <class T>
void init_struct(T *p, size_t size, const T &defaults) {
  if (!p || size < sizeof(uint32_t)) return;
  T d = defaults;
  d.struct_size = uint32_t(std::min(size, sizeof(T)));
  std::memset(p, 0, size);
  std::memcpy(p, &d, d.struct_size);
}

}  // namespace

extern "C" {

uint32_t dsrt_api_version(void) { return DSRT_API_VERSION; }

dsrt_status dsrt_check_version(uint32_t header) {
  const uint32_t mine = DSRT_API_VERSION;
  if ((header >> 16) != (mine >> 16))
    return set_error(DSRT_ERR_VERSION_MISMATCH, "dsrt major version " + std::to_string(mine >> 16) +
                                                    " cannot serve a program built for major " + std::to_string(header >> 16));
  if ((header & 0xffff) > (mine & 0xffff))
    return set_error(DSRT_ERR_VERSION_MISMATCH, "program built for dsrt API minor " + std::to_string(header & 0xffff) +
                                                    ", library has " + std::to_string(mine & 0xffff));
  t_last_error.clear();
  return DSRT_OK;
}

const char *dsrt_version_string(void) {
#if DSRT_CUDA_BUILT
#define DSRT_BUILD_FLAGS "cuda sm_90a"
#else
#define DSRT_BUILD_FLAGS "cpu only"
#endif
  return "0.1.0 (git " DSRT_GIT_HASH ", " DSRT_BUILD_FLAGS ")";
}

const char *dsrt_status_string(dsrt_status s) {
  switch (s) {
    case DSRT_OK: return "DSRT_OK";
    case DSRT_ERR_INVALID_ARGUMENT: return "DSRT_ERR_INVALID_ARGUMENT";
    case DSRT_ERR_IO: return "DSRT_ERR_IO";
    case DSRT_ERR_FORMAT: return "DSRT_ERR_FORMAT";
    case DSRT_ERR_UNSUPPORTED: return "DSRT_ERR_UNSUPPORTED";
    case DSRT_ERR_OUT_OF_MEMORY: return "DSRT_ERR_OUT_OF_MEMORY";
    case DSRT_ERR_CANCELLED: return "DSRT_ERR_CANCELLED";
    case DSRT_ERR_VERSION_MISMATCH: return "DSRT_ERR_VERSION_MISMATCH";
    case DSRT_ERR_BUFFER_TOO_SMALL: return "DSRT_ERR_BUFFER_TOO_SMALL";
    case DSRT_ERR_CONTEXT_FULL: return "DSRT_ERR_CONTEXT_FULL";
    case DSRT_ERR_BAD_STATE: return "DSRT_ERR_BAD_STATE";
    case DSRT_ERR_NO_DEVICE: return "DSRT_ERR_NO_DEVICE";
    case DSRT_ERR_INTERNAL: return "DSRT_ERR_INTERNAL";
    default: return "DSRT_ERR_UNKNOWN";
  }
}

const char *dsrt_last_error(void) { return t_last_error.c_str(); }

void dsrt_free(void *p) { std::free(p); }

dsrt_status dsrt_system_info(char **json_out) {
  return guarded([&] {
    DSRT_REQUIRE(json_out, "json_out is NULL");
    std::string s = dsrt::system_info_json();
    char *buf = static_cast<char *>(std::malloc(s.size() + 1));
    if (!buf) throw std::bad_alloc();
    std::memcpy(buf, s.c_str(), s.size() + 1);
    *json_out = buf;
  });
}

size_t dsrt_struct_size(int32_t id) {
  switch (id) {
    case DSRT_STRUCT_MODEL_PARAMS: return sizeof(dsrt_model_params);
    case DSRT_STRUCT_MODEL_INFO: return sizeof(dsrt_model_info);
    case DSRT_STRUCT_ENGINE_PARAMS: return sizeof(dsrt_engine_params);
    case DSRT_STRUCT_ENGINE_STATS: return sizeof(dsrt_engine_stats);
    case DSRT_STRUCT_SESSION_PARAMS: return sizeof(dsrt_session_params);
    case DSRT_STRUCT_SAMPLING_PARAMS: return sizeof(dsrt_sampling_params);
    case DSRT_STRUCT_SESSION_STATS: return sizeof(dsrt_session_stats);
    default: return 0;
  }
}

// ---- cancel
dsrt_status dsrt_cancel_create(dsrt_cancel **out) {
  return guarded([&] {
    DSRT_REQUIRE(out, "out is NULL");
    *out = new dsrt_cancel();
  });
}
void dsrt_cancel_trigger(dsrt_cancel *c) {
  if (c) c->flag.store(1, std::memory_order_relaxed);
}
void dsrt_cancel_reset(dsrt_cancel *c) {
  if (c) c->flag.store(0, std::memory_order_relaxed);
}
int32_t dsrt_cancel_is_triggered(const dsrt_cancel *c) { return c ? c->flag.load(std::memory_order_relaxed) : 0; }
void dsrt_cancel_free(dsrt_cancel *c) { delete c; }

// ---- model
void dsrt_model_params_init(dsrt_model_params *p, size_t size) {
  dsrt_model_params d{};
  d.backend = DSRT_BACKEND_AUTO;
  d.n_threads = 0;
  d.validate_scales = 1;
  d.load_mtp = 1;
  init_struct(p, size, d);
}

namespace {
struct LoadCallback {
  dsrt_progress_fn fn;
  void *user;
};
bool load_progress(int stage, uint64_t done, uint64_t total, void *user) {
  auto *cb = static_cast<LoadCallback *>(user);
  return cb->fn(stage, done, total, cb->user) == 0;
}
}  // namespace

dsrt_status dsrt_model_load(const char *dir, const dsrt_model_params *params, dsrt_model **out) {
  return guarded([&] {
    DSRT_REQUIRE(dir, "dir is NULL");
    DSRT_REQUIRE(out, "out is NULL");
    *out = nullptr;
    dsrt_model_params p = read_params(params, dsrt_model_params_init, "dsrt_model_params");
    int32_t backend = p.backend;
    if (backend == DSRT_BACKEND_CUDA) {
      std::string why;
      dsrt::cuda_device_count(&why);
      dsrt::fail(DSRT_ERR_NO_DEVICE, "the CUDA backend is not available in this version of dsrt (" +
                                         std::string(why.empty() ? "GPU present, backend not built yet" : why) + ")");
    }
    if (backend != DSRT_BACKEND_AUTO && backend != DSRT_BACKEND_CPU)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "unknown backend ", backend);
    LoadCallback cb{p.progress_fn, p.progress_user_data};
    dsrt::LoadOptions lo;
    lo.load_mtp = p.load_mtp != 0;
    lo.validate_scales = p.validate_scales != 0;
    if (p.progress_fn) {
      lo.progress = load_progress;
      lo.user = &cb;
    }
    lo.cancel = p.cancel ? &p.cancel->flag : nullptr;
    auto h = std::make_unique<dsrt_model>();
    h->model = dsrt::Model::load(dir, lo);
    h->backend = DSRT_BACKEND_CPU;
    h->n_threads = p.n_threads;
    *out = h.release();
  });
}

void dsrt_model_free(dsrt_model *m) { delete m; }

dsrt_status dsrt_model_info_get(const dsrt_model *m, dsrt_model_info *out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    const dsrt::Model &md = *m->model;
    const dsrt::ModelConfig &c = md.cfg;
    dsrt_model_info i{};
    i.n_vocab = int32_t(c.vocab_size);
    i.n_embd = int32_t(c.hidden_size);
    i.n_layers = int32_t(c.num_hidden_layers);
    i.n_heads = int32_t(c.num_attention_heads);
    i.n_routed_experts = int32_t(c.n_routed_experts);
    i.n_experts_per_tok = int32_t(c.num_experts_per_tok);
    i.n_mtp_layers = int32_t(md.w.mtp.size());
    i.n_ctx_train = int32_t(std::min<int64_t>(c.max_position_embeddings, INT32_MAX));
    i.weights_format = md.w.fp8 ? DSRT_WEIGHTS_FP8 : DSRT_WEIGHTS_BF16;
    i.backend = m->backend;
    i.bos_token_id = int32_t(c.bos_token_id);
    i.eos_token_id = int32_t(c.eos_token_id);
    i.n_params = md.n_params;
    i.weight_bytes = md.w.bytes;
    write_out(out, i, "out");
  });
}

dsrt_status dsrt_model_config_json(const dsrt_model *m, const char **json) {
  return guarded([&] {
    DSRT_REQUIRE(m && json, "model or json is NULL");
    *json = m->model->config_json.c_str();
  });
}

// ---- engine
void dsrt_engine_params_init(dsrt_engine_params *p, size_t size) {
  dsrt_engine_params d{};
  d.max_tokens = 0;
  d.max_batch_tokens = 512;
  d.attention = DSRT_ATTENTION_AUTO;
  init_struct(p, size, d);
}

dsrt_status dsrt_engine_create(dsrt_model *m, const dsrt_engine_params *params, dsrt_engine **out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    DSRT_REQUIRE(out, "out is NULL");
    *out = nullptr;
    dsrt_engine_params p = read_params(params, dsrt_engine_params_init, "dsrt_engine_params");
    DSRT_REQUIRE(p.max_tokens >= 0, "max_tokens must be >= 0");
    DSRT_REQUIRE(p.max_batch_tokens >= 0, "max_batch_tokens must be >= 0");
    dsrt::EngineOptions eo;
    eo.max_tokens = p.max_tokens;
    eo.max_batch_tokens = p.max_batch_tokens;
    switch (p.attention) {
      case DSRT_ATTENTION_AUTO: eo.attention = dsrt::AttentionPolicy::Auto; break;
      case DSRT_ATTENTION_NAIVE: eo.attention = dsrt::AttentionPolicy::Naive; break;
      case DSRT_ATTENTION_ABSORBED: eo.attention = dsrt::AttentionPolicy::Absorbed; break;
      default: dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "unknown attention form ", p.attention);
    }
    eo.backend.n_threads = m->n_threads;
    auto h = std::make_unique<dsrt_engine>();
    h->engine = std::make_shared<dsrt::Engine>(m->model, dsrt::make_cpu_backend(eo.backend), eo);
    h->backend = m->backend;
    *out = h.release();
  });
}

void dsrt_engine_free(dsrt_engine *e) { delete e; }

dsrt_status dsrt_engine_step(dsrt_engine *e, int32_t *n_tokens_out) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    int64_t n = e->engine->step();
    if (n_tokens_out) *n_tokens_out = int32_t(n);
  });
}

dsrt_status dsrt_engine_stats_get(const dsrt_engine *e, dsrt_engine_stats *out) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    dsrt::EngineStats s = e->engine->stats();
    dsrt_engine_stats o{};
    o.n_sessions = int32_t(s.n_sessions);
    o.kv_pages_used = int32_t(s.pages_used);
    o.kv_pages_total = int32_t(s.pages_total);
    o.kv_page_tokens = int32_t(dsrt::kPageTokens);
    o.n_steps = s.n_steps;
    o.n_tokens = s.n_tokens;
    o.max_batch_seqs = s.max_batch_seqs;
    o.forward_seconds = s.forward_seconds;
    write_out(out, o, "out");
  });
}

// ---- session
void dsrt_session_params_init(dsrt_session_params *p, size_t size) {
  dsrt_session_params d{};
  init_struct(p, size, d);
}

dsrt_status dsrt_session_create(dsrt_engine *e, const dsrt_session_params *params, dsrt_session **out) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    DSRT_REQUIRE(out, "out is NULL");
    *out = nullptr;
    dsrt_session_params p = read_params(params, dsrt_session_params_init, "dsrt_session_params");
    DSRT_REQUIRE(p.max_ctx >= 0, "max_ctx must be >= 0");
    auto h = std::make_unique<dsrt_session>();
    h->session = e->engine->create_session(p.max_ctx, p.logits_all != 0, p.seed);
    *out = h.release();
  });
}

void dsrt_session_free(dsrt_session *s) { delete s; }

dsrt_status dsrt_session_append_tokens(dsrt_session *s, const int32_t *tokens, size_t n) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    DSRT_REQUIRE(tokens || n == 0, "tokens is NULL");
    s->session->append(tokens, n);
  });
}

dsrt_status dsrt_session_eval(dsrt_session *s, dsrt_cancel *cancel) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    s->session->eval(cancel ? &cancel->flag : nullptr);
  });
}

dsrt_status dsrt_session_logits(dsrt_session *s, const float **logits, size_t *n_rows, size_t *n_vocab) {
  return guarded([&] {
    DSRT_REQUIRE(s && logits, "session or logits is NULL");
    const dsrt::Session &ss = *s->session;
    if (ss.logits_rows() == 0) dsrt::fail(DSRT_ERR_BAD_STATE, "no logits: evaluate the session's pending tokens first");
    *logits = ss.logits().data();
    if (n_rows) *n_rows = size_t(ss.logits_rows());
    if (n_vocab) *n_vocab = size_t(ss.logits().size() / size_t(ss.logits_rows()));
  });
}

dsrt_status dsrt_session_tokens(dsrt_session *s, const int32_t **tokens, size_t *n) {
  return guarded([&] {
    DSRT_REQUIRE(s && tokens && n, "session, tokens or n is NULL");
    *tokens = s->session->tokens().data();
    *n = s->session->tokens().size();
  });
}

dsrt_status dsrt_session_truncate(dsrt_session *s, size_t n_keep) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    s->session->truncate(n_keep);
  });
}

dsrt_status dsrt_session_reset(dsrt_session *s) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    s->session->reset();
  });
}

dsrt_status dsrt_session_stats_get(const dsrt_session *s, dsrt_session_stats *out) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    auto st = s->session->stats();
    dsrt_session_stats o{};
    o.n_tokens = int32_t(st.n_tokens);
    o.n_pending = int32_t(st.n_pending);
    o.n_pages = int32_t(st.n_pages);
    o.n_evaluated = st.n_evaluated;
    write_out(out, o, "out");
  });
}

// ---- sampling
void dsrt_sampling_params_init(dsrt_sampling_params *p, size_t size) {
  dsrt_sampling_params d{};
  d.temperature = 0.0f;
  init_struct(p, size, d);
}

dsrt_status dsrt_session_sample(dsrt_session *s, const dsrt_sampling_params *params, int32_t *token_out) {
  return guarded([&] {
    DSRT_REQUIRE(s && token_out, "session or token_out is NULL");
    dsrt_sampling_params p = read_params(params, dsrt_sampling_params_init, "dsrt_sampling_params");
    DSRT_REQUIRE(p.temperature >= 0.0f && p.temperature < 1e6f, "temperature must be in [0, 1e6)");
    *token_out = s->session->sample(p.temperature);
  });
}

}  // extern "C"
