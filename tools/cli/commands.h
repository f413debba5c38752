// The subcommands of `dsrt`: each file declares its subcommand's options on the app and runs it. A command's
// exit status goes to `rc`; failures throw Fail (status 1) or Usage (status 2).
#pragma once
#include <CLI/CLI.hpp>

namespace dsrt::cli {

void add_generate(CLI::App &app, int &rc);         // generate.cpp
void add_chat(CLI::App &app, int &rc);             // chat.cpp
void declare_chat(CLI::App &cmd, int &rc);         // chat's options and run on `cmd` (dsrt_chat: the app itself)
void add_eval(CLI::App &app, int &rc);             // eval.cpp
void add_inspect(CLI::App &app, int &rc);          // inspect.cpp
void add_bench(CLI::App &app, int &rc);            // bench.cpp
void add_text_commands(CLI::App &app, int &rc);    // text.cpp: tokenize, template, bench-tokenizer
void add_serve_commands(CLI::App &app, int &rc);   // serve.cpp: serve, bench-serve
void add_tool_commands(CLI::App &app, int &rc);    // tools.cpp: make-tiny, info
void add_worker(CLI::App &app, int &rc);           // dist.cpp: worker (ranks in several processes)

// The app every dsrt program starts from: help formatted as "usage: NAME ...", defaults shown.
void setup_app(CLI::App &app);
// Parses and runs; prints errors as one line "NAME: message" on stderr. Returns the exit status (2 for a bad
// command line).
int run_app(CLI::App &app, int argc, char **argv, const int &rc);

}  // namespace dsrt::cli
