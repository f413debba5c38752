/* An interactive chat over the dsrt C API only. One engine and one session hold the conversation (its KV
 * cache stays between turns); each line you type is a user message, the reply streams as it is generated.
 * Commands: /help /reset /undo /save FILE /load FILE /system TEXT /stats /quit.
 * Ctrl-C stops the reply being generated; Ctrl-C at an empty prompt exits. With stdin not a terminal it
 * reads one message per line and prints only the replies (for scripting). */
#define _POSIX_C_SOURCE 200809L
#include "repl.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dsrt.h"

static dsrt_cancel *g_cancel;            /* the reply being generated */
static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
  (void)sig;
  g_interrupted = 1;
  dsrt_cancel_trigger(g_cancel); /* lock-free: safe in a signal handler */
}

static int32_t on_progress(int32_t stage, uint64_t done, uint64_t total, void *user) {
  (void)user;
  static const char *names[] = {"config", "shards", "tensors"};
  static int last = -1;
  if (stage < 0 || stage > 2 || total == 0) return 0;
  int width = 30, filled = (int)(width * done / total), key = stage * 1000 + (int)(100 * done / total);
  if (key == last) return g_interrupted ? 1 : 0; /* redraw only when the percentage moves */
  last = key;
  fprintf(stderr, "\rloading %-8s [%.*s%*s] %3d%%", names[stage], filled, "##############################",
          width - filled, "", (int)(100 * done / total));
  if (done == total && stage == 2) fputc('\n', stderr);
  return g_interrupted ? 1 : 0;
}

/* 1 if s is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF). */
static int valid_utf8(const unsigned char *s) {
  while (*s) {
    unsigned c = *s, n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : 9;
    if (n == 9) return 0;
    unsigned cp = n == 0 ? c : c & (0x3f >> n);
    for (unsigned i = 1; i <= n; i++) {
      if ((s[i] & 0xc0) != 0x80) return 0;
      cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return 0;
    s += n + 1;
  }
  return 1;
}

/* JSON string literal of s (UTF-8 passes through). */
static char *json_string(const char *s) {
  size_t n = strlen(s), k = 0;
  char *out = malloc(6 * n + 3);
  if (!out) return NULL;
  out[k++] = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      out[k++] = '\\';
      out[k++] = (char)*p;
    } else if (*p < 0x20) {
      k += (size_t)sprintf(out + k, "\\u%04x", *p);
    } else {
      out[k++] = (char)*p;
    }
  }
  out[k++] = '"';
  out[k] = 0;
  return out;
}

struct printer {
  int tty;       /* colours allowed */
  int thinking;  /* inside <think> ... </think> */
};

static int32_t on_event(const dsrt_event *ev, void *user) {
  struct printer *pr = user;
  const char *t = ev->text;
  size_t n = ev->text_len;
  while (n > 0) { /* dim the reasoning between <think> and </think> on a terminal */
    const char *marker = pr->thinking ? "</think>" : "<think>";
    size_t mlen = strlen(marker), i = 0;
    while (i + mlen <= n && memcmp(t + i, marker, mlen) != 0) i++;
    if (i + mlen > n) i = n;
    fwrite(t, 1, i, stdout);
    if (i == n) break;
    fwrite(t + i, 1, mlen, stdout);
    pr->thinking = !pr->thinking;
    if (pr->tty) fputs(pr->thinking ? "\033[2m" : "\033[0m", stdout);
    t += i + mlen;
    n -= i + mlen;
  }
  fflush(stdout);
  if (ev->type == DSRT_EVENT_DONE) {
    if (pr->tty && pr->thinking) fputs("\033[0m", stdout);
    if (ev->finish_reason == DSRT_FINISH_CANCELLED) fputs(" [stopped]", stdout);
    if (ev->finish_reason == DSRT_FINISH_CONTEXT_FULL) fputs(" [context full: /reset]", stdout);
    if (ev->finish_reason == DSRT_FINISH_ERROR) printf(" [error: %s]", dsrt_last_error());
    fputc('\n', stdout);
    fflush(stdout);
  }
  return 0;
}

static int write_file(const char *path, const void *buf, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  size_t w = fwrite(buf, 1, n, f);
  return fclose(f) == 0 && w == n ? 0 : -1;
}

static void *read_file(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 20, len = 0;
  char *buf = malloc(cap);
  size_t r;
  while (buf && (r = fread(buf + len, 1, cap - len, f)) > 0) {
    len += r;
    if (len == cap) {
      char *nb = realloc(buf, cap *= 2);
      if (!nb) {
        free(buf);
        buf = NULL;
      }
      buf = nb;
    }
  }
  fclose(f);
  *n = len;
  return buf;
}

/* Reads a line without its newline into *line (grown as needed). Returns -1 at EOF, -2 on Ctrl-C. */
static int read_line(char **line, size_t *cap) {
  size_t len = 0;
  if (g_interrupted) return -2;
  for (;;) {
    if (len + 2 > *cap) {
      char *nb = realloc(*line, *cap = *cap * 2 + 256);
      if (!nb) return -1;
      *line = nb;
    }
    int c = fgetc(stdin);
    if (c == EOF) {
      if (g_interrupted || (ferror(stdin) && errno == EINTR)) {
        clearerr(stdin);
        return -2;
      }
      if (len == 0) return -1;
      break;
    }
    if (c == '\n') break;
    (*line)[len++] = (char)c;
  }
  if (len && (*line)[len - 1] == '\r') len--;
  (*line)[len] = 0;
  return (int)len;
}

static void help(void) {
  puts("Type a message and press Enter. Commands:\n"
       "  /help          this text\n"
       "  /reset         start a new conversation\n"
       "  /undo          take back the last exchange\n"
       "  /save FILE     save the conversation (tokens + KV cache) to FILE\n"
       "  /load FILE     continue a conversation saved with /save\n"
       "  /system TEXT   set the system prompt and start a new conversation\n"
       "  /stats         speed and cache figures of the last turn\n"
       "  /quit          leave (also Ctrl-D, or Ctrl-C at an empty prompt)\n"
       "Ctrl-C while a reply is streaming stops that reply.");
}

void chat_options_init(struct chat_options *o) {
  memset(o, 0, sizeof *o);
  o->temperature = -1.0f; /* the model's generation_config.json default */
  o->max_new_tokens = 1024;
}

int chat_repl(const struct chat_options *opt) {
  if (dsrt_check_version(DSRT_API_VERSION) != DSRT_OK) {
    fprintf(stderr, "dsrt: %s\n", dsrt_last_error());
    return 1;
  }
  const int interactive = isatty(0);
  struct printer pr = {isatty(1) && getenv("NO_COLOR") == NULL, 0};
  dsrt_model *m = NULL;
  dsrt_engine *e = NULL;
  dsrt_session *s = NULL;
  void *undo = NULL;
  size_t undo_n = 0;
  char *system_prompt = opt->system ? strdup(opt->system) : NULL;
  char *line = NULL;
  size_t cap = 0;
  int rc = 1;

  if (dsrt_cancel_create(&g_cancel) != DSRT_OK) return 1;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint; /* no SA_RESTART: a Ctrl-C interrupts the blocking read */
  sigaction(SIGINT, &sa, NULL);

  dsrt_model_params mp;
  if (opt->model_params) {
    mp = *opt->model_params;
  } else {
    dsrt_model_params_init(&mp, sizeof mp);
    mp.n_threads = opt->n_threads;
    mp.use_mmap = opt->no_mmap ? 0 : 1;
  }
  if (interactive && !mp.progress_fn) mp.progress_fn = on_progress;
  mp.cancel = g_cancel;
  if (dsrt_model_load(opt->model_dir, &mp, &m) != DSRT_OK) {
    fprintf(stderr, "\ndsrt: %s\n", dsrt_last_error());
    goto done;
  }
  dsrt_cancel_reset(g_cancel);
  dsrt_engine_params ep;
  if (opt->engine_params) {
    ep = *opt->engine_params;
  } else {
    dsrt_engine_params_init(&ep, sizeof ep);
    ep.max_tokens = opt->max_ctx;
    ep.mtp_drafts = opt->mtp;
  }
  if (ep.mtp_drafts > 0) { /* without an MTP layer the engine would run silently without drafts */
    dsrt_model_info info;
    info.struct_size = sizeof info;
    if (dsrt_model_info_get(m, &info) == DSRT_OK && info.n_mtp_layers == 0) {
      fprintf(stderr, "dsrt: --mtp: this checkpoint has no MTP layer\n");
      goto done;
    }
  }
  if (dsrt_engine_create(m, &ep, &e) != DSRT_OK || dsrt_session_create(e, NULL, &s) != DSRT_OK) {
    fprintf(stderr, "dsrt: %s\n", dsrt_last_error());
    goto done;
  }
  dsrt_gen_params gp;
  dsrt_gen_params_init(&gp, sizeof gp, m);
  if (opt->temperature >= 0) gp.temperature = opt->temperature;
  gp.max_new_tokens = opt->max_new_tokens;
  if (opt->gen_setup) opt->gen_setup(&gp, opt->gen_setup_user);
  gp.cancel = g_cancel;
  if (interactive) fprintf(stderr, "dsrt %s: chatting with %s (/help for commands)\n", dsrt_version_string(), opt->model_dir);
  int started = 0;    /* the conversation has a first message */
  int undo_empty = 0; /* /undo returns to an empty conversation (the first exchange is the last one) */
  for (;;) {
    if (interactive) {
      fputs("> ", stdout);
      fflush(stdout);
    }
    int len = read_line(&line, &cap); /* a Ctrl-C pending from before the prompt counts as one at it */
    if (len == -1) break;                 /* EOF */
    if (len == -2) {                      /* Ctrl-C at the prompt */
      if (interactive) fputc('\n', stdout);
      break;
    }
    if (len == 0) continue;
    if (line[0] == '/') {
      char *arg = strchr(line, ' ');
      if (arg) *arg++ = 0;
      if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
      if (!strcmp(line, "/help")) {
        help();
      } else if (!strcmp(line, "/reset") || !strcmp(line, "/system")) {
        if (!strcmp(line, "/system")) {
          free(system_prompt);
          system_prompt = arg ? strdup(arg) : NULL;
        }
        dsrt_session_reset(s);
        started = 0;
        undo_empty = 0;
        dsrt_free(undo);
        undo = NULL;
        puts("(new conversation)");
      } else if (!strcmp(line, "/undo")) {
        if (undo_empty) {
          dsrt_session_reset(s);
          started = 0;
          undo_empty = 0;
          puts("(last exchange removed)");
        } else if (!undo) {
          puts("(nothing to undo)");
        } else if (dsrt_session_state_load(s, undo, undo_n) != DSRT_OK) {
          printf("(undo failed: %s)\n", dsrt_last_error());
        } else {
          dsrt_free(undo);
          undo = NULL;
          puts("(last exchange removed)");
        }
      } else if (!strcmp(line, "/save") || !strcmp(line, "/load")) {
        if (!arg || !*arg) {
          printf("usage: %s FILE\n", line);
        } else if (!strcmp(line, "/save")) {
          void *buf = NULL;
          size_t n = 0;
          if (dsrt_session_state_save(s, &buf, &n) != DSRT_OK)
            printf("(save failed: %s)\n", dsrt_last_error());
          else if (write_file(arg, buf, n) != 0)
            printf("(cannot write %s)\n", arg);
          else
            printf("(saved %zu bytes to %s)\n", n, arg);
          dsrt_free(buf);
        } else {
          size_t n = 0;
          void *buf = read_file(arg, &n);
          if (!buf)
            printf("(cannot read %s)\n", arg);
          else if (dsrt_session_state_load(s, buf, n) != DSRT_OK)
            printf("(load failed: %s)\n", dsrt_last_error());
          else {
            started = 1;
            undo_empty = 0;
            dsrt_free(undo);
            undo = NULL;
            printf("(conversation loaded from %s)\n", arg);
          }
          free(buf);
        }
      } else if (!strcmp(line, "/stats")) {
        dsrt_session_stats st;
        st.struct_size = sizeof st;
        dsrt_engine_stats es;
        es.struct_size = sizeof es;
        dsrt_session_stats_get(s, &st);
        dsrt_engine_stats_get(e, &es);
        printf("context %d tokens (%d KV pages); last turn: prompt %d, reused %d, generated %d, "
               "time to first token %.3f s, %.2f tokens/s, MTP drafts kept %d/%d; engine: %d/%d pages, %llu steps\n",
               st.n_tokens + st.n_pending, st.n_pages, st.prompt_tokens, st.reused_tokens, st.generated_tokens,
               st.ttft_seconds, st.decode_tokens_per_second, st.mtp_accepted, st.mtp_drafted, es.kv_pages_used,
               es.kv_pages_total, (unsigned long long)es.n_steps);
      } else {
        printf("unknown command %s (/help)\n", line);
      }
      continue;
    }
    /* A user message: remember the state for /undo, append it, stream the reply. A Ctrl-C from here on
     * (during the prefill too) stops this reply. */
    if (!valid_utf8((const unsigned char *)line)) {
      puts("(that line is not valid UTF-8 text; it was not sent)");
      continue;
    }
    dsrt_cancel_reset(g_cancel);
    g_interrupted = 0;
    dsrt_free(undo);
    undo = NULL;
    undo_empty = !started;
    if (started && dsrt_session_state_save(s, &undo, &undo_n) != DSRT_OK) undo = NULL;
    char *content = json_string(line);
    char *sys = system_prompt && !started ? json_string(system_prompt) : NULL;
    size_t mlen = strlen(content) + (sys ? strlen(sys) : 0) + 96;
    char *msgs = malloc(mlen);
    if (!content || !msgs) goto done;
    if (sys)
      snprintf(msgs, mlen, "[{\"role\":\"system\",\"content\":%s},{\"role\":\"user\",\"content\":%s}]", sys, content);
    else
      snprintf(msgs, mlen, "[{\"role\":\"user\",\"content\":%s}]", content);
    free(content);
    free(sys);
    dsrt_status st = dsrt_session_append_chat(s, msgs, NULL, DSRT_CHAT_ADD_GENERATION_PROMPT);
    free(msgs);
    if (st != DSRT_OK) {
      printf("(error: %s)\n", dsrt_last_error());
      undo_empty = 0;
      continue;
    }
    started = 1;
    pr.thinking = 0;
    if (dsrt_session_generate(s, &gp, on_event, &pr) != DSRT_OK) printf("(error: %s)\n", dsrt_last_error());
    if (opt->verbose) {
      dsrt_session_stats ss;
      ss.struct_size = sizeof ss;
      if (dsrt_session_stats_get(s, &ss) == DSRT_OK)
        fprintf(stderr, "[prompt %d tokens (%d reused), %.1f tokens/s; reply %d tokens, %.1f tokens/s]\n", ss.prompt_tokens,
                ss.reused_tokens, ss.ttft_seconds > 0 ? ss.prompt_tokens / ss.ttft_seconds : 0.0, ss.generated_tokens,
                ss.decode_tokens_per_second);
    }
    g_interrupted = 0; /* a Ctrl-C during the reply stopped the reply; it does not also leave the program */
  }
  rc = 0;
done:
  free(line);
  free(system_prompt);
  dsrt_free(undo);
  dsrt_session_free(s);
  dsrt_engine_free(e);
  dsrt_model_free(m);
  dsrt_cancel_free(g_cancel);
  g_cancel = NULL;
  return rc;
}
