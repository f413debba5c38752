/* The chat REPL of samples/chat: `dsrt chat` and the dsrt_chat program (tools/cli/chat.cpp declares their
 * options once, with CLI11) run it. Uses the dsrt C API only. */
#ifndef DSRT_SAMPLES_CHAT_REPL_H
#define DSRT_SAMPLES_CHAT_REPL_H
#include <stdint.h>

#include "dsrt.h"
#ifdef __cplusplus
extern "C" {
#endif

struct chat_options {
  const char *model_dir;
  const char *system;     /* system prompt, NULL for none */
  int32_t n_threads;      /* 0: all */
  int32_t max_ctx;        /* KV capacity in tokens, 0: the engine's default */
  int32_t max_new_tokens; /* per reply */
  float temperature;      /* < 0: the model's default */
  int32_t mtp;            /* 1: speculative decoding with the model's MTP module */
  int32_t no_mmap;        /* 1: copy the weights into memory instead of mapping the shards */
  int32_t verbose;        /* 1: after each reply, prompt and generated tokens and tokens/s (stderr) */
  /* Optional, for programs with more options (`dsrt chat`): when set, these replace the fields above that
   * they cover (n_threads, no_mmap; max_ctx, mtp). The REPL sets the cancel token; a progress_fn set here
   * replaces its own load display. */
  const dsrt_model_params *model_params;
  const dsrt_engine_params *engine_params;
  /* Called on each reply's generation parameters after the fields above were applied. */
  void (*gen_setup)(dsrt_gen_params *p, void *user);
  void *gen_setup_user;
};

void chat_options_init(struct chat_options *o);
int chat_repl(const struct chat_options *o);

#ifdef __cplusplus
}
#endif
#endif
