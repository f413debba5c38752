/*
 * dsrt.h — the C ABI of dsrt, an inference runtime for DeepSeek-V3-architecture models.
 *
 * Read top to bottom: library and errors, cancellation, model, engine, session, sampling.
 *
 * Rules that hold everywhere:
 *   - Every fallible call returns dsrt_status (0 = DSRT_OK). The text of this thread's last failure is
 *     dsrt_last_error(); it stays valid until this thread's next dsrt call.
 *   - Handles are opaque and reference counted: a session keeps its engine alive, an engine its model.
 *     dsrt_X_free releases the caller's reference; dsrt_X_free(NULL) does nothing.
 *   - Params structs start with `struct_size`; fill them with dsrt_X_params_init(&p, sizeof p) and then set
 *     fields. Fields are only ever appended. No bool, no enum-typed field, no struct by value.
 *   - Strings are UTF-8; paths are NUL-terminated.
 *   - Threads: model and engine calls are safe from any thread. A session is used by one thread at a time,
 *     except dsrt_session_stats. Sessions on different threads may step at once: the engine batches them.
 *
 * Minimal use:
 *   dsrt_model *m; dsrt_engine *e; dsrt_session *s;
 *   dsrt_model_load("/models/DeepSeek-V3", NULL, &m);
 *   dsrt_engine_create(m, NULL, &e);
 *   dsrt_session_create(e, NULL, &s);
 *   dsrt_session_append_tokens(s, prompt, n_prompt);
 *   for (int i = 0; i < 32; i++) {
 *     int32_t tok;
 *     dsrt_session_eval(s, NULL);                 // runs the pending tokens (batched with other sessions)
 *     dsrt_session_sample(s, NULL, &tok);         // greedy by default
 *     dsrt_session_append_tokens(s, &tok, 1);
 *   }
 *   dsrt_session_free(s); dsrt_engine_free(e); dsrt_model_free(m);
 */
#ifndef DSRT_H
#define DSRT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(DSRT_BUILDING)
#    define DSRT_API __declspec(dllexport)
#  else
#    define DSRT_API __declspec(dllimport)
#  endif
#else
#  define DSRT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- library, versions, errors ---- */

#define DSRT_VERSION_MAJOR 0
#define DSRT_VERSION_MINOR 1
#define DSRT_VERSION_PATCH 0
/* major << 16 | minor: the major changes on any removal or reordering, the minor on additions. */
#define DSRT_API_VERSION ((DSRT_VERSION_MAJOR << 16) | DSRT_VERSION_MINOR)

typedef int32_t dsrt_status;
#define DSRT_OK                      0
#define DSRT_ERR_INVALID_ARGUMENT    1  /* NULL handle or pointer, bad value, struct_size too small */
#define DSRT_ERR_IO                  2  /* a file is missing or cannot be read */
#define DSRT_ERR_FORMAT              3  /* a checkpoint file or config is malformed or inconsistent */
#define DSRT_ERR_UNSUPPORTED         4  /* valid but not supported (dtype, architecture, unknown struct fields) */
#define DSRT_ERR_OUT_OF_MEMORY       5
#define DSRT_ERR_CANCELLED           6  /* a cancel token was triggered or a progress callback asked to stop */
#define DSRT_ERR_VERSION_MISMATCH    7
#define DSRT_ERR_BUFFER_TOO_SMALL    8  /* *n_out holds the size needed */
#define DSRT_ERR_CONTEXT_FULL        9  /* the session's context or the engine's KV pool is full */
#define DSRT_ERR_BAD_STATE          10  /* the call does not fit the object's state (e.g. no logits yet) */
#define DSRT_ERR_NO_DEVICE          11  /* the requested backend is not available in this build or machine */
#define DSRT_ERR_INTERNAL           12

/* The library's DSRT_API_VERSION. */
DSRT_API uint32_t dsrt_api_version(void);
/* DSRT_OK when a program built against header_api_version (pass DSRT_API_VERSION) can use this library:
 * same major, and the library's minor is at least the header's. */
DSRT_API dsrt_status dsrt_check_version(uint32_t header_api_version);
/* "0.1.0 (git abc1234, cuda sm_90a)": static string. */
DSRT_API const char *dsrt_version_string(void);
/* Static name of a status code ("DSRT_ERR_FORMAT"). */
DSRT_API const char *dsrt_status_string(dsrt_status s);
/* Detail of this thread's last failure ("" if none); valid until this thread's next dsrt call. */
DSRT_API const char *dsrt_last_error(void);

/* Releases a buffer the library allocated for the caller (dsrt_system_info). */
DSRT_API void dsrt_free(void *p);
/* JSON: CPU threads, CUDA build, devices. Free with dsrt_free. */
DSRT_API dsrt_status dsrt_system_info(char **json_out);

/* The library's sizeof of each public struct, so bindings can check their layouts. 0 for an unknown id. */
#define DSRT_STRUCT_MODEL_PARAMS    1
#define DSRT_STRUCT_MODEL_INFO      2
#define DSRT_STRUCT_ENGINE_PARAMS   3
#define DSRT_STRUCT_ENGINE_STATS    4
#define DSRT_STRUCT_SESSION_PARAMS  5
#define DSRT_STRUCT_SAMPLING_PARAMS 6
#define DSRT_STRUCT_SESSION_STATS   7
DSRT_API size_t dsrt_struct_size(int32_t struct_id);

/* ---------------------------------------------------------------- cancellation ------------------ */

/* A flag any thread may set; work that takes it stops at its next check (per shard while loading, per
 * forward step while evaluating) and returns DSRT_ERR_CANCELLED, leaving its object consistent. */
typedef struct dsrt_cancel dsrt_cancel;
DSRT_API dsrt_status dsrt_cancel_create(dsrt_cancel **out);
DSRT_API void dsrt_cancel_trigger(dsrt_cancel *c);   /* lock-free, safe from any thread */
DSRT_API void dsrt_cancel_reset(dsrt_cancel *c);
DSRT_API int32_t dsrt_cancel_is_triggered(const dsrt_cancel *c);
DSRT_API void dsrt_cancel_free(dsrt_cancel *c);

/* ---------------------------------------------------------------- model ------------------------- */

typedef struct dsrt_model dsrt_model;

#define DSRT_BACKEND_AUTO 0   /* the best available: CUDA when built and a GPU is present, else CPU */
#define DSRT_BACKEND_CPU  1   /* fp32 reference backend */
#define DSRT_BACKEND_CUDA 2

#define DSRT_LOAD_STAGE_CONFIG   0
#define DSRT_LOAD_STAGE_SHARDS   1  /* done/total = shards opened */
#define DSRT_LOAD_STAGE_VALIDATE 2  /* done/total = tensors checked */

/* Called on the loading thread. Return non-zero to abort the load (DSRT_ERR_CANCELLED). */
typedef int32_t (*dsrt_progress_fn)(int32_t stage, uint64_t done, uint64_t total, void *user_data);

typedef struct dsrt_model_params {
  uint32_t struct_size;
  int32_t backend;            /* DSRT_BACKEND_*; default AUTO */
  int32_t n_threads;          /* CPU threads; 0 = all hardware threads */
  int32_t validate_scales;    /* 1 (default): check every FP8 block scale is finite and > 0 */
  int32_t load_mtp;           /* 1 (default): load the MTP layer when the checkpoint has one */
  dsrt_progress_fn progress_fn;
  void *progress_user_data;
  dsrt_cancel *cancel;        /* optional; checked between shards and tensors */
} dsrt_model_params;

DSRT_API void dsrt_model_params_init(dsrt_model_params *p, size_t size);
/* dir: a checkpoint directory as published (config.json, model.safetensors.index.json + shards, or a
 * single model.safetensors). params may be NULL for defaults. */
DSRT_API dsrt_status dsrt_model_load(const char *dir, const dsrt_model_params *params, dsrt_model **out);
DSRT_API void dsrt_model_free(dsrt_model *m);

#define DSRT_WEIGHTS_BF16 0
#define DSRT_WEIGHTS_FP8  1   /* FP8 e4m3 with 128x128 block scales */

typedef struct dsrt_model_info {
  uint32_t struct_size;
  int32_t n_vocab;
  int32_t n_embd;             /* hidden_size */
  int32_t n_layers;           /* main layers (MTP layers not counted) */
  int32_t n_heads;
  int32_t n_routed_experts;
  int32_t n_experts_per_tok;
  int32_t n_mtp_layers;       /* loaded MTP layers */
  int32_t n_ctx_train;        /* max_position_embeddings */
  int32_t weights_format;     /* DSRT_WEIGHTS_* */
  int32_t backend;            /* the backend in use: DSRT_BACKEND_CPU or _CUDA */
  int32_t bos_token_id;       /* -1 if unknown */
  int32_t eos_token_id;       /* -1 if unknown */
  uint64_t n_params;          /* parameters of the main model */
  uint64_t weight_bytes;      /* bytes of all loaded tensors */
} dsrt_model_info;

DSRT_API dsrt_status dsrt_model_info_get(const dsrt_model *m, dsrt_model_info *out);
/* The loaded config.json text, owned by the model. */
DSRT_API dsrt_status dsrt_model_config_json(const dsrt_model *m, const char **json);

/* ---------------------------------------------------------------- engine ------------------------ */

/* An engine owns the latent KV cache (64-token pages) and the forward pass; every session of an engine
 * that has pending tokens goes through the same forward step (one batch). */
typedef struct dsrt_engine dsrt_engine;

typedef struct dsrt_engine_params {
  uint32_t struct_size;
  int32_t max_tokens;         /* KV capacity in tokens over all sessions; 0 = min(n_ctx_train, 16384) */
  int32_t max_batch_tokens;   /* tokens in one forward step (prefill chunk budget); default 512 */
  int32_t attention;          /* DSRT_ATTENTION_*; default AUTO */
} dsrt_engine_params;

#define DSRT_ATTENTION_AUTO     0  /* naive (decompressed) form for prefill chunks, absorbed for decode */
#define DSRT_ATTENTION_NAIVE    1
#define DSRT_ATTENTION_ABSORBED 2

typedef struct dsrt_engine_stats {
  uint32_t struct_size;
  int32_t n_sessions;
  int32_t kv_pages_used;
  int32_t kv_pages_total;
  int32_t kv_page_tokens;     /* 64 */
  uint64_t n_steps;           /* forward steps run */
  uint64_t n_tokens;          /* tokens through the forward */
  uint64_t max_batch_seqs;    /* most sequences seen in one step */
  double forward_seconds;     /* wall time spent in forward steps */
} dsrt_engine_stats;

DSRT_API void dsrt_engine_params_init(dsrt_engine_params *p, size_t size);
DSRT_API dsrt_status dsrt_engine_create(dsrt_model *m, const dsrt_engine_params *p, dsrt_engine **out);
DSRT_API void dsrt_engine_free(dsrt_engine *e);
/* Runs one forward step over the pending tokens of every session (up to max_batch_tokens).
 * *n_tokens_out (optional) = tokens processed; 0 when nothing was pending. */
DSRT_API dsrt_status dsrt_engine_step(dsrt_engine *e, int32_t *n_tokens_out);
DSRT_API dsrt_status dsrt_engine_stats_get(const dsrt_engine *e, dsrt_engine_stats *out);

/* ---------------------------------------------------------------- session ----------------------- */

/* One sequence (conversation) with its KV pages. Tokens appended are pending until a step runs them. */
typedef struct dsrt_session dsrt_session;

typedef struct dsrt_session_params {
  uint32_t struct_size;
  int32_t max_ctx;            /* 0 = the engine's max_tokens */
  int32_t logits_all;         /* 1: keep the logits of every position of the last step, not only the last */
  uint64_t seed;              /* sampling seed; default 0 */
} dsrt_session_params;

typedef struct dsrt_session_stats {
  uint32_t struct_size;
  int32_t n_tokens;           /* tokens in the KV cache */
  int32_t n_pending;          /* appended, not yet evaluated */
  int32_t n_pages;            /* KV pages held */
  uint64_t n_evaluated;       /* tokens evaluated over the session's life */
} dsrt_session_stats;

DSRT_API void dsrt_session_params_init(dsrt_session_params *p, size_t size);
DSRT_API dsrt_status dsrt_session_create(dsrt_engine *e, const dsrt_session_params *p, dsrt_session **out);
DSRT_API void dsrt_session_free(dsrt_session *s);
/* Queues tokens (copied). DSRT_ERR_CONTEXT_FULL if the session would exceed max_ctx; ids are checked. */
DSRT_API dsrt_status dsrt_session_append_tokens(dsrt_session *s, const int32_t *tokens, size_t n);
/* Runs steps until this session has no pending tokens; other sessions' pending tokens ride along in the
 * same steps. cancel (optional) is checked before every step: DSRT_ERR_CANCELLED keeps what was done. */
DSRT_API dsrt_status dsrt_session_eval(dsrt_session *s, dsrt_cancel *cancel);
/* Logits of the last step that completed this session's pending tokens: n_rows = 1 (last position), or
 * every position of that step when logits_all. Row-major [n_rows, n_vocab], owned by the session, valid
 * until its next append/eval/truncate/reset. */
DSRT_API dsrt_status dsrt_session_logits(dsrt_session *s, const float **logits, size_t *n_rows, size_t *n_vocab);
/* Token history in the cache (pending not included); valid until the next mutating call. */
DSRT_API dsrt_status dsrt_session_tokens(dsrt_session *s, const int32_t **tokens, size_t *n);
/* Keeps the first n_keep evaluated tokens, drops the rest (and all pending ones), frees unused pages. */
DSRT_API dsrt_status dsrt_session_truncate(dsrt_session *s, size_t n_keep);
DSRT_API dsrt_status dsrt_session_reset(dsrt_session *s);
DSRT_API dsrt_status dsrt_session_stats_get(const dsrt_session *s, dsrt_session_stats *out);

/* ---------------------------------------------------------------- sampling ---------------------- */

typedef struct dsrt_sampling_params {
  uint32_t struct_size;
  float temperature;          /* 0 = greedy (argmax; ties -> lowest id); default 0 */
} dsrt_sampling_params;

DSRT_API void dsrt_sampling_params_init(dsrt_sampling_params *p, size_t size);
/* Samples one token from the last position's logits with the session's random stream (seeded at create).
 * Does not append it. p may be NULL (greedy). */
DSRT_API dsrt_status dsrt_session_sample(dsrt_session *s, const dsrt_sampling_params *p, int32_t *token_out);

#ifdef __cplusplus
}
#endif
#endif /* DSRT_H */
