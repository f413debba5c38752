// The only file that turns C calls into C++ and back: handles, status codes, thread-local error text.
// Every export catches everything; no exception crosses the ABI.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "api/system_info.h"
#include "core/json.h"
#include "core/log.h"
#include "core/status.h"
#include "core/thread_pool.h"
#include "dsrt.h"
#include "engine/engine.h"
#include "engine/load.h"
#include "model/model.h"
#include "text/chat_template.h"
#include "text/detokenizer.h"

struct dsrt_cancel {
  std::atomic<int> flag{0};
};
struct dsrt_model {
  std::shared_ptr<const dsrt::Model> model;
  std::shared_ptr<const dsrt::Vocabulary> vocab;  // the tokenizer and the ids generation needs from it; freed first
  int32_t backend = DSRT_BACKEND_CPU;
  int32_t n_threads = 0;
};
struct dsrt_engine {
  std::shared_ptr<dsrt::Engine> engine;
  int32_t backend = DSRT_BACKEND_CPU;
};
struct dsrt_session {
  std::shared_ptr<dsrt::Session> session;
  dsrt::Event last_event;  // keeps the text of the event handed out by dsrt_session_next alive
};
struct dsrt_detok {
  std::shared_ptr<const dsrt::Tokenizer> tokenizer;  // keeps the tokenizer alive (past dsrt_model_free)
  std::unique_ptr<dsrt::Detokenizer> d;
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
// accepted only if the fields this library does not know are zero; beyond DSRT_MAX_STRUCT_SIZE the size is
// garbage (scanning it would read past the caller's struct).
template <class T>
T read_params(const T *p, void (*init)(T *, size_t), const char *what) {
  T out;
  init(&out, sizeof(T));
  if (!p) return out;
  const uint32_t n = p->struct_size;
  if (n < sizeof(uint32_t)) dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, what, ".struct_size is ", n, ": call its _init first");
  if (n > DSRT_MAX_STRUCT_SIZE)
    dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, what, ".struct_size is ", n, ", above DSRT_MAX_STRUCT_SIZE (",
                DSRT_MAX_STRUCT_SIZE, "): call its _init first");
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
  if (n < sizeof(uint32_t) || n > DSRT_MAX_STRUCT_SIZE)
    dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, what, "->struct_size is ", n, ": set it to sizeof (at most DSRT_MAX_STRUCT_SIZE)");
  src.struct_size = uint32_t(std::min<size_t>(n, sizeof(T)));
  std::memcpy(dst, &src, src.struct_size);
}

template <class T>
void init_struct(T *p, size_t size, const T &defaults) {
  if (!p || size < sizeof(uint32_t)) return;
  if (size > DSRT_MAX_STRUCT_SIZE) {  // a garbage size: touch only struct_size, which every struct has
    p->struct_size = 0;
    return;
  }
  T d = defaults;
  d.struct_size = uint32_t(std::min(size, sizeof(T)));
  std::memset(p, 0, size);
  std::memcpy(p, &d, d.struct_size);
}

}  // namespace

// Helpers of the text and generation calls.
namespace {
char *dup_string(const std::string &s) {
  char *b = static_cast<char *>(std::malloc(s.size() + 1));
  if (!b) throw std::bad_alloc();
  std::memcpy(b, s.data(), s.size());
  b[s.size()] = 0;
  return b;
}
template <class T>
void copy_out(const T *src, size_t n, T *dst, size_t cap, size_t *n_out) {
  if (n_out) *n_out = n;
  if (n > cap) dsrt::failf(DSRT_ERR_BUFFER_TOO_SMALL, "the output needs ", n, " elements, the buffer holds ", cap);
  if (n) {
    DSRT_REQUIRE(dst, "output buffer is NULL");
    std::memcpy(dst, src, n * sizeof(T));
  }
}
}  // namespace

namespace {
nlohmann::ordered_json parse_json_arg(const char *s, const char *what) {
  return dsrt::parse_json(s, what, DSRT_ERR_INVALID_ARGUMENT);
}
}  // namespace

namespace {
void gen_params_defaults(dsrt_gen_params *p, size_t size) { dsrt_gen_params_init(p, size, nullptr); }

// n_vocab: the model's embedding rows; stop tokens and logit-bias ids outside them are errors naming the id
// (they could never match or apply: ignoring them would hide the caller's mistake).
dsrt::GenParams to_gen(const dsrt_gen_params &p, int64_t n_vocab) {
  DSRT_REQUIRE(p.temperature >= 0.0f && p.temperature < 1e6f, "temperature must be in [0, 1e6)");
  DSRT_REQUIRE(p.top_p > 0.0f && p.top_p <= 1.0f, "top_p must be in (0, 1]");
  DSRT_REQUIRE(p.min_p >= 0.0f && p.min_p <= 1.0f, "min_p must be in [0, 1]");
  DSRT_REQUIRE(p.top_k >= 0, "top_k must be >= 0");
  DSRT_REQUIRE(p.repetition_penalty > 0.0f, "repetition_penalty must be > 0");
  DSRT_REQUIRE(std::isfinite(p.presence_penalty) && std::isfinite(p.frequency_penalty), "penalties must be finite");
  DSRT_REQUIRE(p.max_new_tokens >= 0 && p.penalty_window >= 0, "max_new_tokens and penalty_window must be >= 0");
  DSRT_REQUIRE(p.stop_tokens || p.n_stop_tokens == 0, "stop_tokens is NULL");
  DSRT_REQUIRE(p.stop_strings || p.n_stop_strings == 0, "stop_strings is NULL");
  DSRT_REQUIRE((p.logit_bias_tokens && p.logit_bias_values) || p.n_logit_bias == 0, "logit bias arrays are NULL");
  dsrt::GenParams g;
  g.sampling.temperature = p.temperature;
  g.sampling.top_k = p.top_k;
  g.sampling.top_p = p.top_p;
  g.sampling.min_p = p.min_p;
  g.sampling.repetition_penalty = p.repetition_penalty;
  g.sampling.presence_penalty = p.presence_penalty;
  g.sampling.frequency_penalty = p.frequency_penalty;
  g.sampling.penalty_window = p.penalty_window;
  for (size_t i = 0; i < p.n_logit_bias; i++) {
    const int32_t id = p.logit_bias_tokens[i];
    const float v = p.logit_bias_values[i];
    if (id < 0 || id >= n_vocab)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "logit bias ", i, " names token id ", id, ", outside the vocabulary [0, ", n_vocab, ")");
    if (std::isnan(v) || v == INFINITY)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "logit bias ", i, " (token id ", id, ") is ", v, ": it must be finite or -inf (a ban)");
    g.sampling.logit_bias.push_back({id, v});
  }
  g.max_new_tokens = p.max_new_tokens;
  g.ignore_eos = p.ignore_eos != 0;
  g.skip_special = p.skip_special != 0;
  g.has_seed = p.has_seed != 0;
  g.seed = p.seed;
  for (size_t i = 0; i < p.n_stop_tokens; i++)
    if (p.stop_tokens[i] < 0 || p.stop_tokens[i] >= n_vocab)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "stop token ", i, " is id ", p.stop_tokens[i], ", outside the vocabulary [0, ",
                  n_vocab, ")");
  g.stop_tokens.assign(p.stop_tokens, p.stop_tokens + p.n_stop_tokens);
  for (size_t i = 0; i < p.n_stop_strings; i++) {
    DSRT_REQUIRE(p.stop_strings[i], "a stop string is NULL");
    g.stop_strings.emplace_back(p.stop_strings[i]);
  }
  g.cancel = p.cancel ? &p.cancel->flag : nullptr;
  return g;
}

void fill_event(dsrt_session *s, dsrt_event *ev, int32_t n_generated) {
  const dsrt::Event &e = s->last_event;
  dsrt_event o{};
  o.type = e.done ? DSRT_EVENT_DONE : DSRT_EVENT_TOKEN;
  o.token = e.token;
  o.text = e.text.c_str();
  o.text_len = e.text.size();
  o.finish_reason = int32_t(e.finish);
  o.status = e.status;
  o.n_generated = n_generated;
  write_out(ev, o, "ev");
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

void dsrt_set_log_callback(dsrt_log_fn fn, void *user_data) {
  dsrt::set_log_sink(reinterpret_cast<dsrt::LogSink>(fn), user_data);
}

dsrt_status dsrt_system_info(char **json_out) {
  return guarded([&] {
    DSRT_REQUIRE(json_out, "json_out is NULL");
    *json_out = dup_string(dsrt::system_info_json());
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
    case DSRT_STRUCT_GEN_PARAMS: return sizeof(dsrt_gen_params);
    case DSRT_STRUCT_EVENT: return sizeof(dsrt_event);
    case DSRT_STRUCT_DIST_PARAMS: return sizeof(dsrt_dist_params);
    case DSRT_STRUCT_PREFIX_CACHE_STATS: return sizeof(dsrt_prefix_cache_stats);
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
  d.use_mmap = 1;
  d.devices = nullptr;
  d.n_devices = 0;
  d.device_memory = 0;
  d.device_memory_fraction = 0.0f;
  d.experts_compute = DSRT_EXPERTS_GPU;
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
    if (backend != DSRT_BACKEND_AUTO && backend != DSRT_BACKEND_CPU && backend != DSRT_BACKEND_CUDA)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "unknown backend ", backend);
    std::string why;
    const int n_gpus = dsrt::cuda_devices(&why);
    if (backend == DSRT_BACKEND_CUDA && n_gpus == 0) dsrt::fail(DSRT_ERR_NO_DEVICE, "the CUDA backend is not available: " + why);
    if (backend == DSRT_BACKEND_AUTO) backend = n_gpus > 0 ? DSRT_BACKEND_CUDA : DSRT_BACKEND_CPU;
    LoadCallback cb{p.progress_fn, p.progress_user_data};
    dsrt::LoadOptions lo;
    lo.load_mtp = p.load_mtp != 0;
    lo.validate_scales = p.validate_scales != 0;
    if (p.progress_fn) {
      lo.progress = load_progress;
      lo.user = &cb;
    }
    lo.cancel = p.cancel ? &p.cancel->flag : nullptr;
    lo.config_only = p.tokenizer_only != 0;
    const int64_t max_threads = dsrt::ThreadPool::max_threads();
    if (p.n_threads < 0 || p.n_threads > max_threads)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "n_threads ", p.n_threads, " must be in [0, ", max_threads,
                  "] (0: all hardware threads; at most DSRT_MAX_THREADS_PER_CORE x the hardware threads)");
    lo.shard_access = p.use_mmap != 0 ? dsrt::ShardAccess::Map : dsrt::ShardAccess::Copy;
    DSRT_REQUIRE(p.n_devices >= 0 && (p.n_devices == 0 || p.devices), "devices is NULL with n_devices > 0");
    if (backend == DSRT_BACKEND_CUDA) {
      for (int32_t i = 0; i < p.n_devices; i++) {
        if (p.devices[i] < 0 || p.devices[i] >= n_gpus)
          dsrt::failf(DSRT_ERR_NO_DEVICE, "CUDA device ", p.devices[i], " does not exist (", n_gpus, " found)");
        lo.devices.push_back(dsrt::Device::cuda(p.devices[i]));
      }
      if (lo.devices.empty()) lo.devices.push_back(dsrt::Device::cuda(0));
    }
    lo.device_memory = p.device_memory;
    if (!(p.device_memory_fraction >= 0.0f && p.device_memory_fraction <= 1.0f))  // NaN fails too
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "device_memory_fraction ", p.device_memory_fraction, " must be in (0, 1], or 0");
    lo.device_memory_fraction = p.device_memory_fraction;
    switch (p.experts_compute) {
      case DSRT_EXPERTS_GPU: lo.experts_compute = dsrt::ExpertCompute::Gpu; break;
      case DSRT_EXPERTS_COLD_ON_CPU: lo.experts_compute = dsrt::ExpertCompute::ColdOnCpu; break;
      case DSRT_EXPERTS_ON_CPU: lo.experts_compute = dsrt::ExpertCompute::AllOnCpu; break;
      default: dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "unknown experts_compute ", p.experts_compute);
    }
    auto h = std::make_unique<dsrt_model>();
    dsrt::LoadedModel lm = dsrt::load_model(dir, lo);
    h->model = std::move(lm.model);
    h->vocab = std::move(lm.vocab);
    h->backend = backend;
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
  d.precision = DSRT_PRECISION_AUTO;
  d.tp = 1;
  d.ep = 1;
  init_struct(p, size, d);
}

namespace {
// The dist params with what they leave open resolved from the environment (dist/launcher_env.h); the engine
// params' tp x ep stand in for an open split.
dsrt::DistSpec dist_spec(const dsrt_dist_params *dist, int32_t tp, int32_t ep, bool dp_attention) {
  const dsrt_dist_params d = read_params(dist, dsrt_dist_params_init, "dsrt_dist_params");
  DSRT_REQUIRE(d.world >= 0 && d.world <= 1024, "world must be in [0, 1024]");
  DSRT_REQUIRE(d.rank >= -1, "rank must be >= -1");
  DSRT_REQUIRE(d.tp >= 0 && d.ep >= 0 && d.timeout_ms >= 0, "tp, ep and timeout_ms must be >= 0");
  dsrt::DistSpec s;
  s.world = d.world;
  s.rank = d.rank;
  if (d.coordinator) s.coordinator = d.coordinator;
  s.tp = d.tp;
  s.ep = d.ep;
  s.timeout_ms = d.timeout_ms;
  s.dp_attention = d.dp_attention != 0 || dp_attention;
  s = dsrt::resolve_dist_spec(s);
  if (s.world > 1 && d.tp == 0 && d.ep == 0 && int64_t(tp) * ep == s.world && !s.dp_attention) s.tp = tp, s.ep = ep;
  return s;
}
}  // namespace

void dsrt_dist_params_init(dsrt_dist_params *p, size_t size) {
  dsrt_dist_params d{};
  d.rank = -1;
  init_struct(p, size, d);
}

dsrt_status dsrt_engine_create(dsrt_model *m, const dsrt_engine_params *params, dsrt_engine **out) {
  return dsrt_engine_create_dist(m, params, nullptr, out);
}

dsrt_status dsrt_worker_run(dsrt_model *m, const dsrt_dist_params *dist) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    if (!m->model->has_weights) dsrt::fail(DSRT_ERR_UNSUPPORTED, "the model was loaded with tokenizer_only: no worker can run it");
    const dsrt::DistSpec s = dist_spec(dist, 1, 1, false);
    if (s.world < 2) dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "a worker needs a world of >= 2 ranks, got ", s.world);
    if (s.rank == 0) dsrt::fail(DSRT_ERR_INVALID_ARGUMENT, "rank 0 creates the engine (dsrt_engine_create_dist), it is not a worker");
    dsrt::BackendOptions bo;
    bo.n_threads = m->n_threads;
    // A worker has no engine parameters: its precision is the engine's default (DSRT_PRECISION_AUTO: FP8
    // activations on the GPU), which rank 0 must then use too.
    const bool gpu = m->backend == DSRT_BACKEND_CUDA;
    bo.fp8_activations = gpu;
    dsrt::run_follower_process(*m->model, s, gpu ? dsrt::BackendKind::Cuda : dsrt::BackendKind::Cpu, bo);
  });
}

dsrt_status dsrt_engine_create_dist(dsrt_model *m, const dsrt_engine_params *params, const dsrt_dist_params *dist,
                                    dsrt_engine **out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    DSRT_REQUIRE(out, "out is NULL");
    *out = nullptr;
    dsrt_engine_params p = read_params(params, dsrt_engine_params_init, "dsrt_engine_params");
    DSRT_REQUIRE(p.max_tokens >= 0, "max_tokens must be >= 0");
    DSRT_REQUIRE(p.max_batch_tokens >= 0, "max_batch_tokens must be >= 0");
    if (!m->model->has_weights) dsrt::fail(DSRT_ERR_UNSUPPORTED, "the model was loaded with tokenizer_only: no engine can run it");
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
    eo.backend.experts_compute = m->model->experts_compute;
    if (p.precision != DSRT_PRECISION_AUTO && p.precision != DSRT_PRECISION_FP32 && p.precision != DSRT_PRECISION_FP8)
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "unknown precision ", p.precision);
    // AUTO: FP8 activations on a GPU (tensor cores for GEMMs of many rows), the fp32 reference on the CPU.
    eo.backend.fp8_activations = p.precision == DSRT_PRECISION_FP8 ||
                                 (p.precision == DSRT_PRECISION_AUTO && m->backend == DSRT_BACKEND_CUDA);
    if (!(p.kv_memory_fraction >= 0.0f && p.kv_memory_fraction <= 0.95f))  // NaN fails too
      dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "kv_memory_fraction ", p.kv_memory_fraction,
                  " must be in (0, 0.95], or 0 to size the pool by max_tokens");
    eo.kv_memory_fraction = p.kv_memory_fraction;
    DSRT_REQUIRE(p.mtp_drafts >= 0 && p.mtp_drafts <= 4, "mtp_drafts must be in [0, 4]");
    eo.mtp_drafts = p.mtp_drafts;
    DSRT_REQUIRE(p.tp >= 1 && p.ep >= 1 && int64_t(p.tp) * p.ep <= 1024, "tp and ep must be >= 1 (and tp * ep <= 1024)");
    eo.tp = p.tp;
    eo.ep = p.ep;
    eo.dp_attention = p.dp_attention != 0;
    if (dist) eo.dist = dist_spec(dist, p.tp, p.ep, eo.dp_attention);
    if (eo.dist.world < 2) eo.dist = {};
    eo.backend_kind = m->backend == DSRT_BACKEND_CUDA ? dsrt::BackendKind::Cuda : dsrt::BackendKind::Cpu;
    const dsrt::Placement &pl = m->model->placement;
    if (!pl.devices.empty()) eo.backend.device = pl.devices[0].device.index;
    auto h = std::make_unique<dsrt_engine>();
    h->engine = std::make_shared<dsrt::Engine>(m->model, m->vocab, eo);
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

dsrt_status dsrt_engine_set_profiling(dsrt_engine *e, int32_t enable) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    e->engine->set_profiling(enable != 0);
  });
}

dsrt_status dsrt_engine_profile_json(dsrt_engine *e, char **json_out) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    DSRT_REQUIRE(json_out, "json_out is NULL");
    *json_out = nullptr;
    nlohmann::json j = nlohmann::json::array();
    for (const dsrt::OpTime &t : e->engine->op_times()) j.push_back({{"op", t.op}, {"calls", t.calls}, {"ms", t.ms}});
    *json_out = dup_string(j.dump());
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
    o.mtp_drafted = s.mtp_drafted;
    o.mtp_accepted = s.mtp_accepted;
    o.device_seconds = s.backend.device_seconds;
    o.graph_replays = s.backend.graph_replays;
    o.graph_captures = s.backend.graph_captures;
    o.expert_hits = s.backend.expert_hits;
    o.expert_misses = s.backend.expert_misses;
    o.expert_bytes_copied = s.backend.expert_bytes_copied;
    o.expert_bytes_read_in_host = s.backend.expert_bytes_read_in_host;
    o.experts_on_cpu = s.backend.experts_on_cpu;
    o.expert_bytes_cpu = s.backend.expert_bytes_cpu;
    write_out(out, o, "out");
  });
}

dsrt_status dsrt_engine_set_prefix_cache(dsrt_engine *e, int32_t max_pages) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    DSRT_REQUIRE(max_pages >= -1, "max_pages must be -1 (the whole pool), 0 (off) or a page count");
    e->engine->set_prefix_cache(max_pages);
  });
}

dsrt_status dsrt_engine_prefix_cache_stats(const dsrt_engine *e, dsrt_prefix_cache_stats *out) {
  return guarded([&] {
    DSRT_REQUIRE(e, "engine is NULL");
    dsrt::EngineStats s = e->engine->stats();
    dsrt_prefix_cache_stats o{};
    o.max_pages = int32_t(std::clamp<int64_t>(s.prefix_cache_limit, -1, INT32_MAX));
    o.pages = int32_t(s.pages_cached);
    o.hits = s.prefix_hits;
    o.cached_tokens = s.prefix_tokens;
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
    dsrt::Session &ss = *s->session;
    const dsrt::Session::LogitsView v = ss.logits_view();
    if (v.rows == 0) dsrt::fail(DSRT_ERR_BAD_STATE, "no logits: evaluate the session's pending tokens first");
    *logits = v.data;
    if (n_rows) *n_rows = size_t(v.rows);
    if (n_vocab) *n_vocab = size_t(ss.vocab());
  });
}

dsrt_status dsrt_session_tokens(dsrt_session *s, const int32_t **tokens, size_t *n) {
  return guarded([&] {
    DSRT_REQUIRE(s && tokens && n, "session, tokens or n is NULL");
    const std::span<const int32_t> v = s->session->tokens_view();
    *tokens = v.data();
    *n = v.size();
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
    o.prompt_tokens = int32_t(st.prompt_tokens);
    o.reused_tokens = int32_t(st.reused_tokens);
    o.generated_tokens = int32_t(st.generated_tokens);
    o.ttft_seconds = st.ttft_seconds;
    o.decode_tokens_per_second = st.decode_tokens_per_second;
    o.mtp_drafted = int32_t(st.mtp_drafted);
    o.mtp_accepted = int32_t(st.mtp_accepted);
    write_out(out, o, "out");
  });
}

dsrt_status dsrt_session_cached_tokens(const dsrt_session *s, int32_t *n_out) {
  return guarded([&] {
    DSRT_REQUIRE(s && n_out, "session or n_out is NULL");
    *n_out = int32_t(s->session->stats().cached_tokens);
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

dsrt_status dsrt_session_keep_logprobs(dsrt_session *s, int32_t keep) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    s->session->keep_logprobs(keep != 0);
  });
}

dsrt_status dsrt_session_token_logprobs(dsrt_session *s, int32_t *token_out, float *logprob_out, int32_t *top_tokens,
                                        float *top_logprobs, size_t cap, size_t *n_top_out) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    DSRT_REQUIRE((top_tokens && top_logprobs) || cap == 0, "top_tokens or top_logprobs is NULL with cap > 0");
    if (n_top_out) *n_top_out = 0;
    std::vector<std::pair<int32_t, float>> top;
    int32_t tok = -1;
    const float lp = s->session->token_logprobs(cap, &tok, top);
    for (size_t i = 0; i < top.size(); i++) {
      top_tokens[i] = top[i].first;
      top_logprobs[i] = top[i].second;
    }
    if (token_out) *token_out = tok;
    if (logprob_out) *logprob_out = lp;
    if (n_top_out) *n_top_out = top.size();
  });
}

// ---- text

dsrt_status dsrt_tokenize(const dsrt_model *m, const char *text, size_t len, int32_t flags, int32_t *tokens, size_t cap,
                          size_t *n_out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    DSRT_REQUIRE(text || len == 0, "text is NULL");
    const std::vector<int32_t> ids = m->vocab->tok().encode_prompt(
        std::string_view(text ? text : "", len), flags & DSRT_TOKENIZE_ADD_SPECIAL, flags & DSRT_TOKENIZE_PARSE_SPECIAL);
    copy_out(ids.data(), ids.size(), tokens, cap, n_out);
  });
}

dsrt_status dsrt_detokenize(const dsrt_model *m, const int32_t *tokens, size_t n, int32_t flags, char *buf, size_t cap,
                            size_t *n_out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    DSRT_REQUIRE(tokens || n == 0, "tokens is NULL");
    std::string s = m->vocab->tok().decode(std::vector<int32_t>(tokens, tokens + n), flags & DSRT_DETOKENIZE_SKIP_SPECIAL);
    copy_out(s.data(), s.size(), buf, cap, n_out);
  });
}

dsrt_status dsrt_token_bytes(const dsrt_model *m, int32_t token, char *buf, size_t cap, size_t *n_out) {
  return guarded([&] {
    DSRT_REQUIRE(m, "model is NULL");
    const dsrt::Tokenizer &t = m->vocab->tok();
    if (token < 0 || token >= t.n_tokens()) dsrt::failf(DSRT_ERR_INVALID_ARGUMENT, "token ", token, " is out of range");
    const std::string &s = t.token_bytes(token);
    copy_out(s.data(), s.size(), buf, cap, n_out);
  });
}

int32_t dsrt_token_attr(const dsrt_model *m, int32_t token) {
  if (!m || !m->vocab->tokenizer) return DSRT_TOKEN_ATTR_UNUSED;
  return m->vocab->tokenizer->attr(token);
}

int32_t dsrt_special_token(const dsrt_model *m, int32_t kind) {
  if (!m || !m->vocab->tokenizer) return -1;
  const dsrt::Tokenizer &t = *m->vocab->tokenizer;
  switch (kind) {
    case DSRT_SPECIAL_BOS: return t.bos_id;
    case DSRT_SPECIAL_EOS: return t.eos_id;
    case DSRT_SPECIAL_THINK_BEGIN: return t.find_token("<think>");
    case DSRT_SPECIAL_THINK_END: return t.find_token("</think>");
    case DSRT_SPECIAL_USER: {
      int32_t id = t.find_token("<｜User｜>");
      return id >= 0 ? id : t.find_token("<|im_user|>");
    }
    case DSRT_SPECIAL_ASSISTANT: {
      int32_t id = t.find_token("<｜Assistant｜>");
      return id >= 0 ? id : t.find_token("<|im_assistant|>");
    }
    default: return -1;
  }
}

dsrt_status dsrt_detok_create(const dsrt_model *m, int32_t flags, dsrt_detok **out) {
  return guarded([&] {
    DSRT_REQUIRE(m && out, "model or out is NULL");
    auto d = std::make_unique<dsrt_detok>();
    d->d = std::make_unique<dsrt::Detokenizer>(m->vocab->tok(), (flags & DSRT_DETOKENIZE_SKIP_SPECIAL) != 0);
    d->tokenizer = m->vocab->tokenizer;
    *out = d.release();
  });
}

dsrt_status dsrt_detok_push(dsrt_detok *d, int32_t token, const char **text, size_t *len) {
  return guarded([&] {
    DSRT_REQUIRE(d && text && len, "detok, text or len is NULL");
    const std::string &s = d->d->push(token);
    *text = s.c_str();
    *len = s.size();
  });
}

dsrt_status dsrt_detok_flush(dsrt_detok *d, const char **text, size_t *len) {
  return guarded([&] {
    DSRT_REQUIRE(d && text && len, "detok, text or len is NULL");
    const std::string &s = d->d->flush();
    *text = s.c_str();
    *len = s.size();
  });
}

void dsrt_detok_free(dsrt_detok *d) { delete d; }

// ---- chat
dsrt_status dsrt_chat_template(const dsrt_model *m, const char **tmpl) {
  return guarded([&] {
    DSRT_REQUIRE(m && tmpl, "model or tmpl is NULL");
    const dsrt::Tokenizer &t = m->vocab->tok();
    *tmpl = t.chat_template.empty() ? nullptr : t.chat_template.c_str();
  });
}


dsrt_status dsrt_chat_apply(const dsrt_model *m, const char *messages_json, const char *tools_json, const char *kwargs_json,
                            int32_t flags, char **prompt_out) {
  return dsrt_chat_apply_n(m, messages_json, tools_json, kwargs_json, flags, prompt_out, nullptr);
}

dsrt_status dsrt_chat_apply_n(const dsrt_model *m, const char *messages_json, const char *tools_json, const char *kwargs_json,
                              int32_t flags, char **prompt_out, size_t *prompt_len) {
  return guarded([&] {
    DSRT_REQUIRE(m && messages_json && prompt_out, "model, messages_json or prompt_out is NULL");
    const dsrt::Tokenizer &t = m->vocab->tok();
    nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
    if (kwargs_json) {
      ctx = parse_json_arg(kwargs_json, "kwargs_json");
      if (!ctx.is_object()) dsrt::fail(DSRT_ERR_INVALID_ARGUMENT, "kwargs_json must be a JSON object");
    }
    ctx["messages"] = parse_json_arg(messages_json, "messages_json");
    if (!ctx["messages"].is_array()) dsrt::fail(DSRT_ERR_INVALID_ARGUMENT, "messages_json must be a JSON array");
    if (tools_json) ctx["tools"] = parse_json_arg(tools_json, "tools_json");
    ctx["add_generation_prompt"] = (flags & DSRT_CHAT_ADD_GENERATION_PROMPT) != 0;
    ctx["bos_token"] = t.bos_text;
    ctx["eos_token"] = t.eos_text;
    dsrt::ChatTemplate tmpl(t.chat_template.empty() ? dsrt::ChatTemplate::builtin_deepseek_v3() : t.chat_template);
    const std::string prompt = tmpl.render(ctx);
    *prompt_out = dup_string(prompt);
    if (prompt_len) *prompt_len = prompt.size();
  });
}

// ---- streaming generation
dsrt_status dsrt_session_append_text(dsrt_session *s, const char *text, size_t len, int32_t flags) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    DSRT_REQUIRE(text || len == 0, "text is NULL");
    s->session->append_text(std::string_view(text ? text : "", len), flags & DSRT_TOKENIZE_PARSE_SPECIAL,
                            flags & DSRT_TOKENIZE_ADD_SPECIAL);
  });
}

dsrt_status dsrt_session_append_chat(dsrt_session *s, const char *messages_json, const char *tools_json, int32_t flags) {
  return guarded([&] {
    DSRT_REQUIRE(s && messages_json, "session or messages_json is NULL");
    s->session->append_chat(messages_json, tools_json ? tools_json : "", flags & DSRT_CHAT_ADD_GENERATION_PROMPT);
  });
}

void dsrt_gen_params_init(dsrt_gen_params *p, size_t size, const dsrt_model *m) {
  dsrt_gen_params d{};
  d.max_new_tokens = 256;
  d.top_p = 1.0f;
  d.repetition_penalty = 1.0f;
  d.penalty_window = 64;
  d.skip_special = 1;
  if (m) {
    const dsrt::GenerationDefaults &g = m->model->gen_defaults;
    if (g.has_temperature && g.do_sample) d.temperature = g.temperature;
    if (g.has_top_p) d.top_p = g.top_p;
    if (g.has_top_k) d.top_k = g.top_k;
  }
  init_struct(p, size, d);
}


dsrt_status dsrt_session_start(dsrt_session *s, const dsrt_gen_params *params) {
  return guarded([&] {
    DSRT_REQUIRE(s, "session is NULL");
    dsrt_gen_params p = read_params(params, gen_params_defaults, "dsrt_gen_params");
    s->session->start(to_gen(p, s->session->vocab()));
  });
}

dsrt_status dsrt_session_next(dsrt_session *s, dsrt_event *ev) {
  dsrt_status st = guarded([&] {
    DSRT_REQUIRE(s && ev, "session or ev is NULL");
    DSRT_REQUIRE(ev->struct_size >= sizeof(uint32_t) && ev->struct_size <= DSRT_MAX_STRUCT_SIZE,
                 "ev->struct_size is not set (or above DSRT_MAX_STRUCT_SIZE)");
    s->last_event = s->session->next();
    fill_event(s, ev, int32_t(s->session->stats().generated_tokens));
  });
  if (st == DSRT_OK && s->last_event.finish == dsrt::Finish::Error) set_error(s->last_event.status, s->last_event.error);
  return st;
}

dsrt_status dsrt_session_generate(dsrt_session *s, const dsrt_gen_params *p, dsrt_event_fn fn, void *user_data) {
  dsrt_status st = dsrt_session_start(s, p);
  if (st != DSRT_OK) return st;
  for (;;) {
    dsrt_event ev;
    ev.struct_size = sizeof ev;
    st = dsrt_session_next(s, &ev);
    if (st != DSRT_OK) return st;
    if (fn && fn(&ev, user_data) != 0 && ev.type != DSRT_EVENT_DONE) s->session->cancel();
    if (ev.type == DSRT_EVENT_DONE) return DSRT_OK;
  }
}

void dsrt_session_cancel(dsrt_session *s) {
  if (s) s->session->cancel();
}

dsrt_status dsrt_session_fork(dsrt_session *s, dsrt_session **out) {
  return guarded([&] {
    DSRT_REQUIRE(s && out, "session or out is NULL");
    auto h = std::make_unique<dsrt_session>();
    h->session = s->session->fork();
    *out = h.release();
  });
}

dsrt_status dsrt_session_state_save(dsrt_session *s, void **buf, size_t *n) {
  return guarded([&] {
    DSRT_REQUIRE(s && buf && n, "session, buf or n is NULL");
    std::string blob = s->session->save_state();
    void *b = std::malloc(std::max<size_t>(blob.size(), 1));
    if (!b) throw std::bad_alloc();
    std::memcpy(b, blob.data(), blob.size());
    *buf = b;
    *n = blob.size();
  });
}

dsrt_status dsrt_session_state_load(dsrt_session *s, const void *buf, size_t n) {
  return guarded([&] {
    DSRT_REQUIRE(s && (buf || n == 0), "session or buf is NULL");
    s->session->load_state(std::string(static_cast<const char *>(buf), n));
  });
}

}  // extern "C"
