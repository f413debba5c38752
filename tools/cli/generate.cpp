// `dsrt generate`: tokens after a prompt given as ids (prints the ids) or as text (streams the reply).
// Ctrl-C stops at the next step and prints what was generated; a second Ctrl-C exits at once.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>

#include "commands.h"
#include "dist.h"
#include "load.h"
#include "progress.h"

namespace dsrt::cli {

namespace {

struct GenerateOptions {
  ModelOptions model;
  EngineOptions engine;
  DistOptions dist;
  GenOptions gen;
  std::string tokens, prompt, prompt_file;
  bool print_ids = false;
};

// ---- Ctrl-C: the first one triggers the cancel token (lock-free, so signal-safe) and the loop stops at the
// next step; the handler then goes back to the default, so a second one ends the process.
dsrt_cancel *g_cancel = nullptr;
volatile sig_atomic_t g_interrupted = 0;

void on_sigint(int) {
  g_interrupted = 1;
  if (g_cancel) dsrt_cancel_trigger(g_cancel);
  signal(SIGINT, SIG_DFL);
}

struct SigintScope {
  struct sigaction old {};
  SigintScope() {
    check(dsrt_cancel_create(&g_cancel));
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
  }
  ~SigintScope() {
    sigaction(SIGINT, &old, nullptr);
    dsrt_cancel_free(g_cancel);
    g_cancel = nullptr;
  }
};

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> parse_tokens(const std::string &s) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string t = s.substr(i, j - i);
    char *end = nullptr;
    const long v = std::strtol(t.c_str(), &end, 10);
    if (t.empty() || *end || v < 0 || v > INT32_MAX) throw Usage{"--tokens: \"" + t + "\" is not a token id"};
    out.push_back(int32_t(v));
    i = j + 1;
  }
  if (out.empty()) throw Usage{"--tokens is empty"};
  return out;
}

// Evaluates the session's prompt in chunks of the engine's step budget, with the progress display on a
// terminal. Returns false when Ctrl-C stopped it.
bool prefill(dsrt_session *s, const std::vector<int32_t> &prompt, int chunk, Progress &progress) {
  for (size_t i = 0; i < prompt.size(); i += size_t(chunk)) {
    const size_t n = std::min(prompt.size() - i, size_t(chunk));
    check(dsrt_session_append_tokens(s, prompt.data() + i, n));
    const dsrt_status st = dsrt_session_eval(s, g_cancel);
    if (st == DSRT_ERR_CANCELLED) return false;
    check(st);
    if (prompt.size() > size_t(chunk)) progress.update("prefill", i + n, prompt.size(), "tokens");
  }
  progress.finish();
  return true;
}

void summary(const GenerateOptions &o, size_t prompt, double prompt_s, size_t generated, double gen_s) {
  if (!o.gen.verbose) return;
  std::fprintf(stderr, "prompt %zu tokens in %.3f s (%.1f tokens/s); generated %zu tokens in %.3f s (%.1f tokens/s)\n", prompt,
               prompt_s, prompt_s > 0 ? double(prompt) / prompt_s : 0.0, generated, gen_s,
               gen_s > 0 ? double(generated) / gen_s : 0.0);
}

// The session a generate run decodes in, seeded from the options.
std::unique_ptr<dsrt_session, void (*)(dsrt_session *)> new_session(const Loaded &l, const GenOptions &g) {
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  sp.seed = g.seed.value_or(0);
  dsrt_session *s = nullptr;
  check(dsrt_session_create(l.engine, &sp, &s));
  return {s, dsrt_session_free};
}

int run_ids(const GenerateOptions &o, const dsrt_dist_params *dist) {
  const std::vector<int32_t> prompt = parse_tokens(o.tokens);
  const int n = o.gen.max_tokens.value_or(16);
  if (n < 1) throw Usage{"-n must be >= 1 with --tokens (0, no limit, applies to a text prompt)"};
  const long long need = (long long)prompt.size() + n;
  if (o.gen.ctx && o.gen.ctx < need)
    throw Usage{"--ctx " + std::to_string(o.gen.ctx) + " is less than the prompt (" + std::to_string(prompt.size()) +
                " tokens) plus -n " + std::to_string(n)};
  SigintScope sigint;
  Loaded l;
  load(o.model, o.engine, l, o.gen.ctx ? o.gen.ctx : int(need), g_cancel, dist);
  const auto guard = new_session(l, o.gen);
  dsrt_session *s = guard.get();
  dsrt_sampling_params smp;
  dsrt_sampling_params_init(&smp, sizeof smp);
  smp.temperature = o.gen.temperature.value_or(0.0f);
  Progress progress(o.model.quiet);
  auto t0 = Clock::now();
  bool stopped = !prefill(s, prompt, o.engine.max_batch_tokens, progress);
  const double prompt_s = since(t0);
  std::string line;
  int generated = 0;
  t0 = Clock::now();
  for (int i = 0; i < n && !stopped; i++) {
    if (i > 0) {
      const dsrt_status st = dsrt_session_eval(s, g_cancel);
      if (st == DSRT_ERR_CANCELLED) break;
      check(st);
    }
    int32_t tok;
    check(dsrt_session_sample(s, &smp, &tok));
    line += (i ? "," : "") + std::to_string(tok);
    generated++;
    if (i + 1 < n) check(dsrt_session_append_tokens(s, &tok, 1));
    stopped = g_interrupted;
  }
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  summary(o, prompt.size(), prompt_s, size_t(generated), since(t0));
  if (g_interrupted) {
    std::fprintf(stderr, "dsrt generate: interrupted after %d of %d tokens\n", generated, n);
    return 130;
  }
  return 0;
}

struct Streamed {
  size_t tokens = 0;
  bool ends_with_newline = true;
};

int32_t on_event(const dsrt_event *ev, void *user) {
  auto *st = static_cast<Streamed *>(user);
  if (ev->token >= 0) st->tokens++;
  if (ev->text_len) {
    std::fwrite(ev->text, 1, ev->text_len, stdout);
    std::fflush(stdout);
    st->ends_with_newline = ev->text[ev->text_len - 1] == '\n';
  }
  return 0;
}

std::string read_prompt_file(const std::string &path) {
  std::ostringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
    return ss.str();
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail{"--prompt-file: cannot read " + path};
  ss << f.rdbuf();
  return ss.str();
}

int run_text(const GenerateOptions &o, const dsrt_dist_params *dist) {
  const std::string text = o.prompt_file.empty() ? o.prompt : read_prompt_file(o.prompt_file);
  SigintScope sigint;
  Loaded l;
  load(o.model, o.engine, l, o.gen.ctx, g_cancel, dist);
  const auto guard = new_session(l, o.gen);
  dsrt_session *s = guard.get();
  const int32_t flags = DSRT_TOKENIZE_ADD_SPECIAL | DSRT_TOKENIZE_PARSE_SPECIAL;
  size_t n = 0;
  dsrt_status st = dsrt_tokenize(l.model, text.data(), text.size(), flags, nullptr, 0, &n);
  if (st != DSRT_OK && st != DSRT_ERR_BUFFER_TOO_SMALL) check(st);
  std::vector<int32_t> prompt(n);
  check(dsrt_tokenize(l.model, text.data(), text.size(), flags, prompt.data(), prompt.size(), &n));
  if (prompt.empty()) throw Usage{"the prompt is empty"};
  Progress progress(o.model.quiet);
  auto t0 = Clock::now();
  const bool prefilled = prefill(s, prompt, o.engine.max_batch_tokens, progress);
  const double prompt_s = since(t0);
  Streamed out;
  if (prefilled) {
    dsrt_gen_params p;
    dsrt_gen_params_init(&p, sizeof p, l.model);
    std::vector<const char *> stops;
    apply_gen(o.gen, p, stops);
    if (!o.gen.max_tokens) p.max_new_tokens = 256;
    p.cancel = g_cancel;
    t0 = Clock::now();
    check(dsrt_session_generate(s, &p, on_event, &out));
  }
  if (!out.ends_with_newline || out.tokens == 0) std::fputc('\n', stdout);
  std::fflush(stdout);
  summary(o, prompt.size(), prompt_s, out.tokens, prefilled ? since(t0) : 0.0);
  if (o.engine.mtp) {
    dsrt_session_stats ss;
    ss.struct_size = sizeof ss;
    check(dsrt_session_stats_get(s, &ss));
    std::fprintf(stderr, "MTP: %d of %d drafts kept; %d tokens at %.2f tokens/s\n", ss.mtp_accepted, ss.mtp_drafted,
                 ss.generated_tokens, ss.decode_tokens_per_second);
  }
  if (g_interrupted) {
    std::fprintf(stderr, "dsrt generate: interrupted after %zu tokens\n", out.tokens);
    return 130;
  }
  return 0;
}

int run_generate(const GenerateOptions &o, const dsrt_dist_params *dist) {
  if (!o.tokens.empty()) return run_ids(o, dist);
  if (o.prompt.empty() && o.prompt_file.empty()) throw Usage{"give the prompt: --tokens IDS, -p TEXT or -f FILE"};
  return run_text(o, dist);
}

}  // namespace

void add_generate(CLI::App &app, int &rc) {
  auto o = std::make_shared<GenerateOptions>();
  auto *cmd = app.add_subcommand("generate", "sample tokens after a prompt (token ids or text)");
  cmd->footer(
      "With --tokens: the generated ids, comma-separated on one line of stdout, and nothing else (-n default 16;\n"
      "greedy unless --temperature). With -p/-f: the text (BOS added, special tokens matched) is the prompt and\n"
      "the reply streams to stdout (-n default 256; -n 0: until end of text or the context is full).\n"
      "Ctrl-C stops at the next step and prints what was generated (exit status 130); a second Ctrl-C exits.");
  add_model_options(*cmd, o->model);
  auto *tok = cmd->add_option("--tokens", o->tokens, "the prompt as token ids, comma-separated: prints the generated ids")
                  ->type_name("IDS");
  auto *pr = cmd->add_option("-p,--prompt", o->prompt, "the prompt text: streams the reply")->type_name("TEXT");
  auto *pf = cmd->add_option("-f,--prompt-file", o->prompt_file, "the prompt text from FILE ('-': stdin)")
                 ->type_name("FILE");
  tok->excludes(pr)->excludes(pf);
  pr->excludes(pf);
  cmd->add_flag("--print-ids", o->print_ids, "with --tokens: print the ids (what --tokens prints anyway; for scripts)")
      ->needs(tok);
  add_gen_options(*cmd, o->gen,
                  "tokens to generate (default: 16 with --tokens, 256 with a text prompt; 0 with a text prompt: until "
                  "end of text or a full context)");
  for (const char *text_only : {"--top-p", "--top-k", "--min-p", "--stop"}) cmd->get_option(text_only)->excludes(tok);
  add_engine_options(*cmd, o->engine);
  add_dist_options(*cmd, o->dist);
  cmd->callback([o, cmd, &rc] {
    rc = run_as_rank(*cmd, o->model, o->engine, o->dist, "generate",
                     [&](const dsrt_dist_params *d) { return run_generate(*o, d); });
  });
}

}  // namespace dsrt::cli
