// dsrt_chat: the chat REPL of samples/chat as a program of its own, with exactly the options of `dsrt chat`
// (both declare them with declare_chat in tools/cli/chat.cpp).
#include "commands.h"

int main(int argc, char **argv) {
  using namespace dsrt::cli;
  CLI::App app{"An interactive chat (samples/chat's REPL over the C API): /help lists its commands.", "dsrt_chat"};
  setup_app(app);
  int rc = 0;
  declare_chat(app, rc);
  return run_app(app, argc, argv, rc);
}
