/* Minimal C use of dsrt: load a checkpoint, greedy-generate after a prompt of token ids.
 * usage: dsrt_example_c MODEL_DIR [n_tokens] */
#include <stdio.h>
#include <stdlib.h>

#include "dsrt.h"

static int check(dsrt_status s) {
  if (s != DSRT_OK) fprintf(stderr, "%s: %s\n", dsrt_status_string(s), dsrt_last_error());
  return s != DSRT_OK;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL_DIR [n_tokens]\n", argv[0]);
    return 2;
  }
  if (check(dsrt_check_version(DSRT_API_VERSION))) return 1;
  int n = argc > 2 ? atoi(argv[2]) : 16;
  dsrt_model *m = NULL;
  dsrt_engine *e = NULL;
  dsrt_session *s = NULL;
  int rc = 1;
  if (check(dsrt_model_load(argv[1], NULL, &m))) goto done;
  if (check(dsrt_engine_create(m, NULL, &e))) goto done;
  if (check(dsrt_session_create(e, NULL, &s))) goto done;
  {
    const int32_t prompt[] = {0, 5, 17, 42};
    if (check(dsrt_session_append_tokens(s, prompt, 4))) goto done;
    for (int i = 0; i < n; i++) {
      int32_t tok;
      if (check(dsrt_session_eval(s, NULL)) || check(dsrt_session_sample(s, NULL, &tok))) goto done;
      printf("%s%d", i ? "," : "", tok);
      if (check(dsrt_session_append_tokens(s, &tok, 1))) goto done;
    }
    printf("\n");
  }
  rc = 0;
done:
  dsrt_session_free(s);
  dsrt_engine_free(e);
  dsrt_model_free(m);
  return rc;
}
