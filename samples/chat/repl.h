/* The chat REPL of samples/chat, also behind `dsrt chat`. Uses the dsrt C API only. */
#ifndef DSRT_SAMPLES_CHAT_REPL_H
#define DSRT_SAMPLES_CHAT_REPL_H
#include <stdint.h>
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
};

void chat_options_init(struct chat_options *o);
int chat_repl(const struct chat_options *o);

#ifdef __cplusplus
}
#endif
#endif
