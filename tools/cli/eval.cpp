// `dsrt eval`: the logits of every position of a token-id prompt, as float32 [T, vocab], into a file.
#include <climits>
#include <cstdio>
#include <fstream>
#include <memory>

#include "commands.h"
#include "dist.h"
#include "load.h"

namespace dsrt::cli {

namespace {

struct EvalOptions {
  ModelOptions model;
  EngineOptions engine;
  DistOptions dist;
  std::vector<int32_t> tokens;
  std::string logits_out;
};

int run_eval(const EvalOptions &o, const dsrt_dist_params *dist) {
  Loaded l;
  load(o.model, o.engine, l, int(o.tokens.size()), nullptr, dist);
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  sp.logits_all = 1;
  dsrt_session *s = nullptr;
  check(dsrt_session_create(l.engine, &sp, &s));
  std::unique_ptr<dsrt_session, void (*)(dsrt_session *)> guard(s, dsrt_session_free);
  check(dsrt_session_append_tokens(s, o.tokens.data(), o.tokens.size()));
  check(dsrt_session_eval(s, nullptr));
  const float *logits;
  size_t rows, vocab;
  check(dsrt_session_logits(s, &logits, &rows, &vocab));
  if (rows != o.tokens.size()) throw Fail{"internal: expected logits for every position"};
  std::ofstream f(o.logits_out, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char *>(logits), std::streamsize(rows * vocab * sizeof(float)));
  if (!f) throw Fail{o.logits_out + ": write failed"};
  std::fprintf(stderr, "wrote logits [%zu, %zu] to %s\n", rows, vocab, o.logits_out.c_str());
  return 0;
}

}  // namespace

void add_eval(CLI::App &app, int &rc) {
  auto o = std::make_shared<EvalOptions>();
  auto *cmd = app.add_subcommand("eval", "write the logits of every position to a file");
  cmd->footer("Writes the logits of every position as float32 little-endian, row-major [T, vocab], into FILE.");
  add_model_options(*cmd, o->model);
  cmd->add_option("--tokens", o->tokens, "the token ids, comma-separated")
      ->required()
      ->delimiter(',')
      ->check(CLI::Range(0, INT32_MAX))
      ->type_name("IDS");
  cmd->add_option("--logits-out", o->logits_out, "the file to write")->required()->type_name("FILE");
  add_engine_options(*cmd, o->engine);
  add_dist_options(*cmd, o->dist);
  cmd->callback([o, cmd, &rc] {
    rc = run_as_rank(*cmd, o->model, o->engine, o->dist, "eval",
                     [&](const dsrt_dist_params *d) { return run_eval(*o, d); });
  });
}

}  // namespace dsrt::cli
