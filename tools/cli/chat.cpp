// `dsrt chat` and dsrt_chat: the samples/chat REPL with the shared model, engine and generation options.
#include <memory>

#include "commands.h"
#include "options.h"
#include "progress.h"
#include "repl.h"

namespace dsrt::cli {

namespace {

struct ChatOptions {
  ModelOptions model;
  EngineOptions engine;
  GenOptions gen;
  std::string system;
  std::vector<const char *> stops;
};

void gen_setup(dsrt_gen_params *p, void *user) {
  auto *o = static_cast<ChatOptions *>(user);
  apply_gen(o->gen, *p, o->stops);
}

int run_chat(ChatOptions &o) {
  if (o.model.model.empty()) throw Usage{"give the checkpoint directory: -m DIR (or DIR)"};
  dsrt_model_params mp = model_params(o.model);
  Progress progress(o.model.quiet);
  if (progress.enabled()) {
    mp.progress_fn = Progress::load_callback;
    mp.progress_user_data = &progress;
  }
  const dsrt_engine_params ep = engine_params(o.engine, o.gen.ctx);
  chat_options c;
  chat_options_init(&c);
  c.model_dir = o.model.model.c_str();
  c.system = o.system.empty() ? nullptr : o.system.c_str();
  c.model_params = &mp;
  c.engine_params = &ep;
  c.gen_setup = gen_setup;
  c.gen_setup_user = &o;
  c.verbose = o.gen.verbose ? 1 : 0;
  c.max_new_tokens = o.gen.max_tokens.value_or(c.max_new_tokens);
  return chat_repl(&c);
}

}  // namespace

void declare_chat(CLI::App &cmd, int &rc) {
  auto o = std::make_shared<ChatOptions>();
  cmd.footer("Commands in the chat: /help /reset /undo /save FILE /load FILE /system TEXT /stats /quit. Ctrl-C stops a\n"
             "reply; Ctrl-C at an empty prompt exits. With stdin not a terminal: one message per line, only the\n"
             "replies are printed.");
  add_model_options(cmd, o->model, /*positional=*/true);
  cmd.add_option("-s,--system", o->system, "system prompt")->type_name("TEXT");
  add_gen_options(cmd, o->gen, "tokens per reply at most (default 1024; 0: until end of text or a full context)");
  add_engine_options(cmd, o->engine);
  cmd.callback([o, &rc] { rc = run_chat(*o); });
}

void add_chat(CLI::App &app, int &rc) {
  declare_chat(*app.add_subcommand("chat", "interactive chat (the samples/chat REPL; also the dsrt_chat program)"), rc);
}

}  // namespace dsrt::cli
