/* samples/chat: a streaming chat REPL over the dsrt C API.
 * usage: dsrt_chat MODEL_DIR [--system TEXT] [--threads N] [--temperature T] [--max-tokens N] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repl.h"

int main(int argc, char **argv) {
  struct chat_options o;
  chat_options_init(&o);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--system") && v) o.system = argv[++i];
    else if (!strcmp(a, "--threads") && v) o.n_threads = atoi(argv[++i]);
    else if (!strcmp(a, "--temperature") && v) o.temperature = (float)atof(argv[++i]);
    else if (!strcmp(a, "--max-tokens") && v) o.max_new_tokens = atoi(argv[++i]);
    else if (!strcmp(a, "--ctx") && v) o.max_ctx = atoi(argv[++i]);
    else if (!strcmp(a, "--mtp")) o.mtp = 1;
    else if (a[0] != '-' && !o.model_dir) o.model_dir = a;
    else {
      fprintf(stderr, "usage: %s MODEL_DIR [--system TEXT] [--threads N] [--temperature T] [--max-tokens N] [--ctx N] [--mtp]\n", argv[0]);
      return 2;
    }
  }
  if (!o.model_dir) {
    fprintf(stderr, "usage: %s MODEL_DIR [options]\n", argv[0]);
    return 2;
  }
  return chat_repl(&o);
}
