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
 *     fields. Fields are only ever appended. No bool, no enum-typed field, no struct by value. A struct_size
 *     above DSRT_MAX_STRUCT_SIZE is DSRT_ERR_INVALID_ARGUMENT (an _init given such a size sets struct_size
 *     to 0 and writes nothing else), so a garbage size never makes the library read or write past a struct.
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
#define DSRT_ERR_IO                  2  /* a file is missing or cannot be read; another rank cannot be reached,
                                          died or did not answer within the timeout */
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

/* The library's log. By default it goes to stderr; a callback receives each message instead (any thread,
 * one message at a time; the text is valid during the call). NULL restores stderr. */
#define DSRT_LOG_DEBUG 0
#define DSRT_LOG_INFO  1
#define DSRT_LOG_WARN  2
#define DSRT_LOG_ERROR 3
typedef void (*dsrt_log_fn)(int32_t level, const char *message, void *user_data);
DSRT_API void dsrt_set_log_callback(dsrt_log_fn fn, void *user_data);

/* The library's sizeof of each public struct, so bindings can check their layouts. 0 for an unknown id. */
#define DSRT_STRUCT_MODEL_PARAMS    1
#define DSRT_STRUCT_MODEL_INFO      2
#define DSRT_STRUCT_ENGINE_PARAMS   3
#define DSRT_STRUCT_ENGINE_STATS    4
#define DSRT_STRUCT_SESSION_PARAMS  5
#define DSRT_STRUCT_SAMPLING_PARAMS 6
#define DSRT_STRUCT_SESSION_STATS   7
#define DSRT_STRUCT_GEN_PARAMS      8
#define DSRT_STRUCT_EVENT           9
#define DSRT_STRUCT_DIST_PARAMS     10
#define DSRT_STRUCT_PREFIX_CACHE_STATS 11
DSRT_API size_t dsrt_struct_size(int32_t struct_id);
/* The largest struct_size any call accepts: far above every struct of this header and its successors. */
#define DSRT_MAX_STRUCT_SIZE 4096

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

#define DSRT_BACKEND_AUTO 0   /* CUDA when this build has it and a GPU is present, else the CPU */
#define DSRT_BACKEND_CPU  1   /* fp32 reference backend */
#define DSRT_BACKEND_CUDA 2   /* builds with CUDA, on a machine with a GPU: DSRT_ERR_NO_DEVICE otherwise */

#define DSRT_LOAD_STAGE_CONFIG   0
#define DSRT_LOAD_STAGE_SHARDS   1  /* done/total = shards opened */
#define DSRT_LOAD_STAGE_VALIDATE 2  /* done/total = tensors checked */
#define DSRT_LOAD_STAGE_TEXT     3  /* done/total = tokenizer and generation config files read (last) */

/* Called on the loading thread. Return non-zero to abort the load (DSRT_ERR_CANCELLED). */
typedef int32_t (*dsrt_progress_fn)(int32_t stage, uint64_t done, uint64_t total, void *user_data);

/* n_threads may be at most this many times the machine's hardware threads: each thread is a stack and a
 * scheduling slot, and a pool far larger than the machine only adds contention. */
#define DSRT_MAX_THREADS_PER_CORE 4

typedef struct dsrt_model_params {
  uint32_t struct_size;
  int32_t backend;            /* DSRT_BACKEND_*; default AUTO */
  int32_t n_threads;          /* CPU threads; 0 = all hardware threads; at most DSRT_MAX_THREADS_PER_CORE x
                                 the hardware threads (more, or < 0, is DSRT_ERR_INVALID_ARGUMENT) */
  int32_t validate_scales;    /* 1 (default): check every FP8 block scale is finite and > 0 */
  int32_t load_mtp;           /* 1 (default): load the MTP layer when the checkpoint has one */
  dsrt_progress_fn progress_fn;
  void *progress_user_data;
  dsrt_cancel *cancel;        /* optional; checked between files, shards and tensors */
  int32_t tokenizer_only;     /* 1: load config.json + tokenizer files only (text calls, no generation) */
  int32_t use_mmap;           /* 1 (default): weights are read in place from the mmapped shards, which must
                                 not change while the model is loaded (a truncated shard kills the process
                                 with SIGBUS; the engine checks size/mtime/inode between steps and fails
                                 with DSRT_ERR_IO). 0: weights are copied into memory at load (the
                                 checkpoint's size in RAM, slower load), immune to later file changes. */
  const int32_t *devices;     /* CUDA device indices the weights are placed on (n_devices of them); NULL: device 0 */
  int32_t n_devices;          /* today at most 1 */
  uint64_t device_memory;     /* bytes of each device the weights and one engine's KV pool may take (scratch
                                 and CUDA's own needs not counted). The non-expert weights and the bytes of a
                                 KV pool of min(n_ctx_train, 16384) tokens (the default max_tokens) must fit
                                 (DSRT_ERR_OUT_OF_MEMORY at load, naming the bytes needed); routed experts fill
                                 the rest, whole experts round robin over the layers, and those that do not fit
                                 stay in host memory, where the GPU reads them in place over PCIe (expert
                                 offload; the memory they lie in is pinned). An engine's KV pool must then fit
                                 the bytes kept for it (a larger dsrt_engine_params.max_tokens is
                                 DSRT_ERR_OUT_OF_MEMORY; kv_memory_fraction is a share of them). dsrt inspect
                                 --placement shows the split. 0 = no budget: the weights take what is free,
                                 less 1 GiB of working room, and the KV pool takes what they leave. */
  float device_memory_fraction; /* (0, 1]: the budget (as device_memory) is this share of the device's free
                                   memory at load (instead of device_memory); 0 = off */
  int32_t experts_compute;    /* DSRT_EXPERTS_*: where routed experts in host memory are computed (CUDA) */
} dsrt_model_params;

/* dsrt_model_params.experts_compute, with expert offload on a GPU: */
#define DSRT_EXPERTS_GPU 0         /* default: on the GPU, from its expert cache or read over PCIe */
#define DSRT_EXPERTS_COLD_ON_CPU 1 /* each step, a cost model sends the missed experts to the GPU (over PCIe) or
                                      to the CPU (read from host memory), whichever finishes sooner */
#define DSRT_EXPERTS_ON_CPU 2      /* every routed expert on the CPU, none on the GPU (llama.cpp's -ot exps=CPU) */

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
  int32_t precision;          /* DSRT_PRECISION_*; default AUTO */
  float kv_memory_fraction;   /* > 0: the KV pool takes this share (at most 0.95) of the backend's free
                                 memory after the weights (GPU: device memory), instead of max_tokens */
  int32_t mtp_drafts;         /* 1..4: speculative decoding with the checkpoint's MTP module: during
                                 generation turns each step also verifies up to this many drafted tokens
                                 (the first from the MTP layer, the next ones chaining it on its own output);
                                 the output is the same as with 0, in fewer steps when drafts are kept.
                                 0 (default): off. No effect without an MTP layer (dsrt_model_info.n_mtp_layers,
                                 dsrt_model_params.load_mtp). */
  int32_t tp;                 /* tensor-parallel ranks (attention heads, FFN columns, vocabulary split); default 1 */
  int32_t ep;                 /* expert-parallel ranks (routed experts split); default 1. The engine runs tp * ep
                                 ranks, today as threads of this process on the CPU backend; tp must divide the
                                 attention heads and ep the routed experts (DSRT_ERR_INVALID_ARGUMENT otherwise). */
  int32_t dp_attention;       /* 1: data-parallel attention (tp 1, ep = the ranks): each rank runs attention, the
                                 dense layers and the head whole on its own sessions and keeps only their latent
                                 cache (max_tokens or kv_memory_fraction is then per rank), and MoE layers send only
                                 the routed rows between ranks. For batches of many sessions. With mtp_drafts:
                                 DSRT_ERR_UNSUPPORTED. 0 (default): attention tensor-parallel over the tp ranks. */
} dsrt_engine_params;

/* AUTO: DSRT_PRECISION_FP8 on a GPU, DSRT_PRECISION_FP32 on the CPU. */
#define DSRT_PRECISION_AUTO 0
/* fp32 activations in every GEMM: the CPU reference's numbers (~1e-6 CUDA vs CPU), slower prefill. */
#define DSRT_PRECISION_FP32 1
/* GEMMs of >= 8 rows with FP8 weights take FP8 activations, quantised per token per 128 channels (W8A8,
 * the format the model was trained in): on a GPU, tensor-core block-scaled GEMMs; on the CPU, the same
 * rounding in fp32 arithmetic (the reference the GPU's FP8 path is tested against). Each such GEMM moves
 * its output by ~2-3% against fp32 activations; decode steps of fewer than 8 rows are unchanged. */
#define DSRT_PRECISION_FP8 2

#define DSRT_ATTENTION_AUTO     0  /* naive (decompressed) form for prefill chunks (> 2 tokens), absorbed for
                                      decode steps (1 token, or 2 with an MTP draft) */
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
  uint64_t mtp_drafted;       /* MTP drafts verified */
  uint64_t mtp_accepted;      /* ... and kept */
  double device_seconds;      /* GPU time of the forward steps (CUDA events from a step's first launch to its
                                 results back on the host; lags one step); 0 on the CPU */
  uint64_t graph_replays;     /* CUDA: step segments replayed from a CUDA graph ... */
  uint64_t graph_captures;    /* ... and captured into one (a segment is captured the second time it is seen) */
  /* Expert offload's GPU expert cache (CUDA, DSRT_EXPERT_CACHE), summed over MoE layers and steps; lags a step: */
  uint64_t expert_hits;       /* routed experts a step needed that were in a device slot ... */
  uint64_t expert_misses;     /* ... or were not (each counted once per layer and step) */
  uint64_t expert_bytes_copied;       /* bytes copied from host memory into slots over PCIe */
  uint64_t expert_bytes_read_in_host; /* bytes the expert kernels read in place from host memory (estimated) */
  uint64_t experts_on_cpu;    /* routed experts computed on the CPU (DSRT_EXPERTS_ON_CPU, _COLD_ON_CPU) ... */
  uint64_t expert_bytes_cpu;  /* ... and their weight bytes */
} dsrt_engine_stats;

DSRT_API void dsrt_engine_params_init(dsrt_engine_params *p, size_t size);
DSRT_API dsrt_status dsrt_engine_create(dsrt_model *m, const dsrt_engine_params *p, dsrt_engine **out);
DSRT_API void dsrt_engine_free(dsrt_engine *e);

/* Ranks in several processes (and hosts): CPU ranks over Gloo, GPU ranks over NCCL, a GPU per process (docs/engine.md, "Ranks in several processes"). Every
 * process loads the same checkpoint; rank 0 creates the engine with dsrt_engine_create_dist and serves sessions,
 * ranks 1..world-1 call dsrt_worker_run, which returns when rank 0's engine is freed. The ranks meet at rank 0's
 * rendezvous (TCP, at `coordinator`), which checks that they agree on the world size, the ranks, tp x ep, the dsrt
 * version and the checkpoint, then connect through Gloo (a build without Gloo: DSRT_ERR_UNSUPPORTED). A rank
 * that dies or hangs fails the current step on every other rank within timeout_ms (DSRT_ERR_IO; tokens already
 * emitted are kept) and the group is then unusable; a worker whose rank 0 died returns DSRT_ERR_IO. A write to a
 * dead peer must not raise SIGPIPE: joining sets SIGPIPE to ignored when it has the default disposition. */
typedef struct dsrt_dist_params {
  uint32_t struct_size;
  int32_t world;              /* ranks in all processes; 0 (default): from the launcher's environment when a
                                 coordinator is known (OMPI_COMM_WORLD_SIZE, SLURM_NTASKS, WORLD_SIZE), else 1 */
  int32_t rank;               /* this process's rank; -1 (default): from the launcher (OMPI_COMM_WORLD_RANK,
                                 SLURM_PROCID, RANK) */
  const char *coordinator;    /* "HOST:PORT" where rank 0 serves the rendezvous (copied); NULL (default):
                                 $DSRT_COORDINATOR, else $MASTER_ADDR:$MASTER_PORT */
  int32_t tp;                 /* the split, tp * ep == world; 0 (default): the engine params' tp and ep when they
                                 multiply to the world, else what the other one leaves (tp = world, ep = 1 for both 0) */
  int32_t ep;
  int32_t timeout_ms;         /* how long a rank waits for another (joining, each collective); 0 (default):
                                 $DSRT_DIST_TIMEOUT_MS, else 120000. An idle worker waits for rank 0's next step
                                 as long as rank 0's process lives. */
  int32_t dp_attention;       /* 1: data-parallel attention (dsrt_engine_params.dp_attention), which a worker must
                                 be told as rank 0 is; 0 (default): rank 0's engine params say */
} dsrt_dist_params;

DSRT_API void dsrt_dist_params_init(dsrt_dist_params *p, size_t size);
/* As dsrt_engine_create, as rank 0 of the ranks `dist` describes: returns once every rank has joined (or fails:
 * DSRT_ERR_INVALID_ARGUMENT for a wrong world size, a duplicate rank or a split that does not divide the model,
 * DSRT_ERR_VERSION_MISMATCH for another dsrt version or checkpoint, DSRT_ERR_IO for a rank missing after the
 * timeout or an address rank 0 cannot listen at). A world of 1 is dsrt_engine_create; a rank other than 0 is
 * DSRT_ERR_INVALID_ARGUMENT (it runs dsrt_worker_run). */
DSRT_API dsrt_status dsrt_engine_create_dist(dsrt_model *m, const dsrt_engine_params *p, const dsrt_dist_params *dist,
                                             dsrt_engine **out);
/* Runs follower rank dist->rank (1..world-1) of rank 0's engine on this thread: joins (errors as above), then
 * computes every step rank 0 sends until rank 0's engine is freed (DSRT_OK) or the group fails (DSRT_ERR_IO:
 * rank 0 died, or a rank died or hung mid-step). The model must be the checkpoint rank 0 loaded, on rank 0's
 * backend: the CPU (n_threads: this process's threads), or CUDA, where the rank takes the GPU of the launcher's
 * local rank (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, LOCAL_RANK; else rank % GPUs), needs NCCL (libnccl.so.2,
 * or $DSRT_NCCL_LIBRARY; else DSRT_ERR_UNSUPPORTED) and computes with FP8 activations (the engine's AUTO). */
DSRT_API dsrt_status dsrt_worker_run(dsrt_model *m, const dsrt_dist_params *dist);
/* Runs one forward step over the pending tokens of every session (up to max_batch_tokens).
 * *n_tokens_out (optional) = tokens processed; 0 when nothing was pending. */
DSRT_API dsrt_status dsrt_engine_step(dsrt_engine *e, int32_t *n_tokens_out);
DSRT_API dsrt_status dsrt_engine_stats_get(const dsrt_engine *e, dsrt_engine_stats *out);
/* Per-op time accounting of the engine's backend (CUDA events on a GPU, wall clock on the CPU); costs a
 * little while on. Enabling (or disabling) clears what was recorded. */
DSRT_API dsrt_status dsrt_engine_set_profiling(dsrt_engine *e, int32_t enable);
/* What was recorded since: a JSON array [{"op": "self_attn.q_b_proj", "calls": 61, "ms": 1.25}, ...],
 * longest total first; linear layers are named by weight, without the layer number. Free with dsrt_free. */
DSRT_API dsrt_status dsrt_engine_profile_json(dsrt_engine *e, char **json_out);

/* Prefix cache. Every full KV page (64 tokens) a session fills is kept, keyed by its token ids from
 * position 0: a later prompt that starts with the same tokens (the same conversation's earlier turns, a
 * common system prompt) takes those pages instead of prefilling them. Pages are shared between sessions
 * and the cache, never written while shared (a session about to write into a shared page copies it first),
 * and only whole pages of identical token ids at identical positions are shared, so the results are those of
 * a full prefill (bitwise on the CPU backend). Cached pages no session holds are evicted, least recently used
 * first, when a session needs pages; they never take pages a session holds or has reserved. On by default
 * (limit: the whole pool); dsrt_session_cached_tokens says how much of a turn's prompt came from it. */
typedef struct dsrt_prefix_cache_stats {
  uint32_t struct_size;
  int32_t max_pages;          /* the limit: -1 = the whole pool, 0 = off */
  int32_t pages;              /* pages the cache holds now (some of them also held by sessions) */
  uint64_t hits;              /* pending runs that started from cached pages */
  uint64_t cached_tokens;     /* tokens those pages held, not prefilled */
} dsrt_prefix_cache_stats;

/* Sets the prefix cache's limit in pages: -1 = the whole pool (default), 0 = off (the cached pages no session
 * holds are freed at once), n > 0 = at most n pages. Any thread. */
DSRT_API dsrt_status dsrt_engine_set_prefix_cache(dsrt_engine *e, int32_t max_pages);
DSRT_API dsrt_status dsrt_engine_prefix_cache_stats(const dsrt_engine *e, dsrt_prefix_cache_stats *out);

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
  int32_t prompt_tokens;      /* last turn: tokens prefilled */
  int32_t reused_tokens;      /* last chat append: tokens of the rendered conversation already cached */
  int32_t generated_tokens;   /* last turn */
  double ttft_seconds;        /* last turn: start to first token */
  double decode_tokens_per_second;  /* last turn, after the first token */
  int32_t mtp_drafted;        /* last turn: MTP drafts verified (engine mtp_drafts = 1) */
  int32_t mtp_accepted;       /* last turn: drafts kept (each saves one forward step) */
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
 * until the next call on this session (also safe while other threads step the engine).
 * On a GPU engine (one rank), the steps of a generation turn (dsrt_session_start/next) sample on the GPU and
 * leave their logits there: after such a step this is DSRT_ERR_BAD_STATE, unless the session was created
 * with logits_all or had dsrt_session_keep_logprobs on when the step ran (those steps copy their logits). */
DSRT_API dsrt_status dsrt_session_logits(dsrt_session *s, const float **logits, size_t *n_rows, size_t *n_vocab);
/* Token history in the cache (pending not included); valid until the next call on this session (also
 * safe while other threads step the engine). */
DSRT_API dsrt_status dsrt_session_tokens(dsrt_session *s, const int32_t **tokens, size_t *n);
/* Keeps the first n_keep evaluated tokens, drops the rest (and all pending ones), frees unused pages. */
DSRT_API dsrt_status dsrt_session_truncate(dsrt_session *s, size_t n_keep);
DSRT_API dsrt_status dsrt_session_reset(dsrt_session *s);
DSRT_API dsrt_status dsrt_session_stats_get(const dsrt_session *s, dsrt_session_stats *out);
/* Of the pending tokens evaluated since the last dsrt_session_start (or the session's creation), how many came
 * from the prefix cache rather than a prefill: with prompt_tokens of dsrt_session_stats, the part of the
 * turn's prompt served from the cache (OpenAI's usage.prompt_tokens_details.cached_tokens). */
DSRT_API dsrt_status dsrt_session_cached_tokens(const dsrt_session *s, int32_t *n_out);

/* ---------------------------------------------------------------- sampling ---------------------- */

typedef struct dsrt_sampling_params {
  uint32_t struct_size;
  float temperature;          /* 0 = greedy (argmax; ties -> lowest id); default 0 */
} dsrt_sampling_params;

DSRT_API void dsrt_sampling_params_init(dsrt_sampling_params *p, size_t size);
/* Samples one token from the last position's logits with the session's random stream (seeded at create).
 * Does not append it. p may be NULL (greedy). */
DSRT_API dsrt_status dsrt_session_sample(dsrt_session *s, const dsrt_sampling_params *p, int32_t *token_out);

/* Whether the session keeps, at each sample, the logits row the token was drawn from, for
 * dsrt_session_token_logprobs (off by default: keeping costs a copy of n_vocab floats per sampled token). */
DSRT_API dsrt_status dsrt_session_keep_logprobs(dsrt_session *s, int32_t keep);
/* Log-probabilities of the token this session sampled last (a TOKEN event of dsrt_session_next, a DONE event
 * that carries a token, or dsrt_session_sample) while dsrt_session_keep_logprobs was on: the log-softmax, over
 * the whole vocabulary, of the raw logits row that token was drawn from — before logit bias, penalties,
 * temperature and top-k/top-p/min-p, so the figures do not depend on the sampling parameters (OpenAI's and
 * vLLM's default). The session copies that row when it samples, so this never races with the engine's step
 * thread and may be called while other sessions step. *token_out and *logprob_out (each optional) = the token and its logprob; top_tokens and top_logprobs
 * (both NULL with cap 0) get the min(cap, n_vocab) most likely tokens of the row, most likely first (ties: the
 * lower id first), *n_top_out (optional) their count. DSRT_ERR_BAD_STATE before the session has sampled with
 * keeping on. */
DSRT_API dsrt_status dsrt_session_token_logprobs(dsrt_session *s, int32_t *token_out, float *logprob_out,
                                                 int32_t *top_tokens, float *top_logprobs, size_t cap,
                                                 size_t *n_top_out);

/* ---------------------------------------------------------------- text ------------------------- */
/* Text calls need the checkpoint's tokenizer files (tokenizer.json, tiktoken.model or tokenizer.model);
 * without them they fail with DSRT_ERR_UNSUPPORTED. All are thread-safe. */

#define DSRT_TOKENIZE_ADD_SPECIAL   1  /* add BOS (and EOS) as tokenizer_config.json asks */
#define DSRT_TOKENIZE_PARSE_SPECIAL 2  /* special-token strings in the text become those tokens */
/* Ids of the text's exact bytes into tokens[cap]; *n_out = count (or the count needed, with
 * DSRT_ERR_BUFFER_TOO_SMALL). */
DSRT_API dsrt_status dsrt_tokenize(const dsrt_model *m, const char *text, size_t len, int32_t flags,
                                   int32_t *tokens, size_t cap, size_t *n_out);
#define DSRT_DETOKENIZE_SKIP_SPECIAL 1  /* leave out control tokens (DSRT_TOKEN_ATTR_CONTROL) */
/* Bytes of the tokens into buf[cap] (not NUL-terminated; may hold invalid UTF-8 for partial tokens). An id
 * outside the vocabulary is DSRT_ERR_INVALID_ARGUMENT naming it (here and in dsrt_detok_push). */
DSRT_API dsrt_status dsrt_detokenize(const dsrt_model *m, const int32_t *tokens, size_t n, int32_t flags,
                                     char *buf, size_t cap, size_t *n_out);
DSRT_API dsrt_status dsrt_token_bytes(const dsrt_model *m, int32_t token, char *buf, size_t cap, size_t *n_out);

#define DSRT_TOKEN_ATTR_SPECIAL 1  /* an added/special token */
#define DSRT_TOKEN_ATTR_CONTROL 2  /* special and not shown in text (BOS, EOS, role markers) */
#define DSRT_TOKEN_ATTR_EOG     4  /* ends generation */
#define DSRT_TOKEN_ATTR_UNUSED  8  /* no token has this id (embedding padding) */
DSRT_API int32_t dsrt_token_attr(const dsrt_model *m, int32_t token);

#define DSRT_SPECIAL_BOS 0
#define DSRT_SPECIAL_EOS 1
#define DSRT_SPECIAL_THINK_BEGIN 2
#define DSRT_SPECIAL_THINK_END 3
#define DSRT_SPECIAL_USER 4
#define DSRT_SPECIAL_ASSISTANT 5
/* The id of a special token of the model, -1 if it has none. */
DSRT_API int32_t dsrt_special_token(const dsrt_model *m, int32_t kind);

/* Incremental decoder for callers that sample themselves: pieces are complete UTF-8. */
typedef struct dsrt_detok dsrt_detok;
DSRT_API dsrt_status dsrt_detok_create(const dsrt_model *m, int32_t flags, dsrt_detok **out);  /* flags: DETOKENIZE_* */
/* *text (owned by d, valid until its next call) = text now final; may be empty. */
DSRT_API dsrt_status dsrt_detok_push(dsrt_detok *d, int32_t token, const char **text, size_t *len);
/* End of stream: what is held; bytes that never formed a character become U+FFFD. */
DSRT_API dsrt_status dsrt_detok_flush(dsrt_detok *d, const char **text, size_t *len);
DSRT_API void dsrt_detok_free(dsrt_detok *d);

/* ---------------------------------------------------------------- chat templates ---------------- */

/* The chat_template of tokenizer_config.json (NULL if the checkpoint has none; dsrt then uses DeepSeek-V3's). */
DSRT_API dsrt_status dsrt_chat_template(const dsrt_model *m, const char **tmpl);
#define DSRT_CHAT_ADD_GENERATION_PROMPT 1
/* Renders messages_json (an array of {"role", "content", ...}: OpenAI-shaped, with tool_calls) with the
 * model's template. tools_json and kwargs_json (extra template variables, e.g. {"thinking": true}) may be
 * NULL. *prompt_out is NUL-terminated; free with dsrt_free. */
DSRT_API dsrt_status dsrt_chat_apply(const dsrt_model *m, const char *messages_json, const char *tools_json,
                                     const char *kwargs_json, int32_t flags, char **prompt_out);
/* dsrt_chat_apply with the prompt's length: *prompt_len = its bytes, not counting the terminating NUL. A
 * message's content may hold U+0000; the prompt keeps it as a byte 0, so only the length tells where it ends.
 * dsrt_session_append_chat tokenizes exactly these bytes: dsrt_tokenize(m, prompt, prompt_len,
 * DSRT_TOKENIZE_PARSE_SPECIAL, ...) gives the tokens it appends. JSON input nests at most 256 levels. */
DSRT_API dsrt_status dsrt_chat_apply_n(const dsrt_model *m, const char *messages_json, const char *tools_json,
                                       const char *kwargs_json, int32_t flags, char **prompt_out, size_t *prompt_len);

/* ---------------------------------------------------------------- streaming generation ---------- */

/* Appends tokenized text (flags: DSRT_TOKENIZE_*). */
DSRT_API dsrt_status dsrt_session_append_text(dsrt_session *s, const char *text, size_t len, int32_t flags);
/* Adds chat messages (JSON array) to the session's conversation: the whole conversation is rendered with
 * the chat template and only what is not already in the cache is appended. A finished turn's reply is
 * added to the conversation as an assistant message automatically. flags: DSRT_CHAT_*. */
DSRT_API dsrt_status dsrt_session_append_chat(dsrt_session *s, const char *messages_json, const char *tools_json,
                                              int32_t flags);

typedef struct dsrt_gen_params {
  uint32_t struct_size;
  int32_t max_new_tokens;     /* default 256; 0 = until the context is full */
  float temperature;          /* default: generation_config.json's, else 0 (greedy) */
  int32_t top_k;              /* 0 = off; default from generation_config.json */
  float top_p;                /* 1 = off; default from generation_config.json */
  float min_p;                /* 0 = off */
  float repetition_penalty;   /* 1 = off */
  float presence_penalty;     /* 0 = off */
  float frequency_penalty;    /* 0 = off */
  int32_t penalty_window;     /* recent tokens the penalties look at; default 64; 0 = all */
  int32_t has_seed;           /* 1: reseed the session's random stream with `seed` at start */
  uint64_t seed;
  int32_t ignore_eos;         /* 1: end-of-generation tokens are never sampled */
  int32_t skip_special;       /* 1 (default): text leaves out control tokens */
  const int32_t *stop_tokens; /* copied at start; an id outside [0, n_vocab) is DSRT_ERR_INVALID_ARGUMENT */
  size_t n_stop_tokens;
  const char *const *stop_strings;  /* NUL-terminated UTF-8, copied at start; never appear in the text */
  size_t n_stop_strings;
  const int32_t *logit_bias_tokens; /* added to those tokens' logits; ids in [0, n_vocab), values finite or
                                       -inf (a ban), else DSRT_ERR_INVALID_ARGUMENT at start. Bias and bans
                                       that leave no token to sample fail the step with that code */
  const float *logit_bias_values;
  size_t n_logit_bias;
  dsrt_cancel *cancel;        /* optional: checked per prefill chunk and per decode step */
} dsrt_gen_params;

#define DSRT_EVENT_TOKEN 1
#define DSRT_EVENT_DONE  2

#define DSRT_FINISH_NONE         0
#define DSRT_FINISH_EOS          1
#define DSRT_FINISH_STOP_STRING  2
#define DSRT_FINISH_STOP_TOKEN   3
#define DSRT_FINISH_LENGTH       4
#define DSRT_FINISH_CANCELLED    5
#define DSRT_FINISH_CONTEXT_FULL 6
#define DSRT_FINISH_ERROR        7

typedef struct dsrt_event {
  uint32_t struct_size;
  int32_t type;               /* DSRT_EVENT_* */
  int32_t token;              /* the token this event emits, -1 if none */
  const char *text;           /* complete UTF-8 delta (may be empty), owned by the session until its next call */
  size_t text_len;
  int32_t finish_reason;      /* DONE: DSRT_FINISH_* */
  dsrt_status status;         /* DONE with FINISH_ERROR: the failure (text in dsrt_last_error) */
  int32_t n_generated;        /* tokens generated so far in this turn */
} dsrt_event;

DSRT_API void dsrt_gen_params_init(dsrt_gen_params *p, size_t size, const dsrt_model *m);
/* Begins a generation turn on the session's pending input (p may be NULL: model defaults). */
DSRT_API dsrt_status dsrt_session_start(dsrt_session *s, const dsrt_gen_params *p);
/* The next event of the turn; blocks while it evaluates (batched with other sessions' work). After a DONE
 * event the turn is over; the emitted tokens stay in the session. */
DSRT_API dsrt_status dsrt_session_next(dsrt_session *s, dsrt_event *ev);
/* Called on the generating thread for every event; return non-zero to stop (the turn ends CANCELLED). */
typedef int32_t (*dsrt_event_fn)(const dsrt_event *ev, void *user_data);
/* start + next until DONE on the caller's thread. */
DSRT_API dsrt_status dsrt_session_generate(dsrt_session *s, const dsrt_gen_params *p, dsrt_event_fn fn, void *user_data);
/* Ends the current turn at its next step as CANCELLED. Any thread, while the session handle is alive. */
DSRT_API void dsrt_session_cancel(dsrt_session *s);

/* A new session with a copy of this one's tokens, KV cache, conversation and random state. The KV pages are
 * shared, not copied: each of the two copies a shared page when it first writes into it (one page each). */
DSRT_API dsrt_status dsrt_session_fork(dsrt_session *s, dsrt_session **out);
/* Session state (tokens, conversation, random state, latent KV) as a blob: magic, format version, a hash of
 * every weight byte and the model's fingerprint lead it, a checksum ends it. Loading it into a session of
 * another model, or of one whose weights differ, is DSRT_ERR_VERSION_MISMATCH; a corrupt blob (checksum,
 * lengths, non-finite values, ids) is DSRT_ERR_FORMAT; a blob that is refused leaves the session as it was.
 * The first save or load of a model reads all of its weights once (cached in the model). Blobs of format 1
 * (the format before the checksum) are refused. *buf is freed with dsrt_free. */
DSRT_API dsrt_status dsrt_session_state_save(dsrt_session *s, void **buf, size_t *n);
DSRT_API dsrt_status dsrt_session_state_load(dsrt_session *s, const void *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* DSRT_H */
