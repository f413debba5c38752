// The `dsrt` command. Its subcommands' options are declared with CLI11 in tools/cli/*.cpp (shared ones in
// options.cpp); docs/cli.md describes them. The forms
//   dsrt eval --model DIR --tokens 5,17,42 --logits-out FILE
//   dsrt generate --model DIR --tokens 5,17,42 -n 24 --temperature 0 --print-ids
// are a public contract: other tools script against them. Errors: one line on stderr; exit status 2 for a bad
// command line, 1 for a failure.
#include <cstdio>
#include <functional>
#include <string>

#include "commands.h"
#include "dsrt.h"

int main(int argc, char **argv) {
  using namespace dsrt::cli;
  CLI::App app{"dsrt: inference for DeepSeek-V3-architecture models. `dsrt COMMAND --help` for each command.", "dsrt"};
  setup_app(app);
  app.set_version_flag("-V,--version", std::string("dsrt ") + dsrt_version_string());
  app.require_subcommand(1);
  int rc = 0;
  add_generate(app, rc);
  add_chat(app, rc);
  add_serve_commands(app, rc);
  add_text_commands(app, rc);
  add_eval(app, rc);
  add_inspect(app, rc);
  add_bench(app, rc);
  add_tool_commands(app, rc);
  add_worker(app, rc);
  if (argc < 2) {
    std::fputs(app.help().c_str(), stderr);
    return 2;
  }
  const std::string first = argv[1];
  const std::function<bool(CLI::App *)> named = [&first](CLI::App *a) { return a->check_name(first); };
  const auto subs = app.get_subcommands(named);
  if (first[0] != '-' && subs.empty()) {  // CLI11 would say "a subcommand is required"
    std::fprintf(stderr, "dsrt: unknown command \"%s\" (dsrt --help lists them)\n", first.c_str());
    return 2;
  }
  return run_app(app, argc, argv, rc);
}
