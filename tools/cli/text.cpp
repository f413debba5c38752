// Tokenizer-only commands: tokenize, template (public forms other tools script against), bench-tokenizer.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "load.h"

namespace dsrt::cli {

namespace {

std::string read_file(const std::string &opt, const std::string &path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail{opt + ": cannot read " + path};
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct TextOptions {
  std::string model, text_file, messages, tools, kwargs;
  bool add_special = false, add_generation_prompt = false;
  int repeat = 5;
};

CLI::Option *add_model(CLI::App &cmd, TextOptions &o) {
  return cmd.add_option("-m,--model", o.model, "checkpoint directory (config.json and tokenizer files suffice)")
      ->required()
      ->check(CLI::ExistingDirectory);
}

int run_tokenize(const TextOptions &o) {
  const std::string text = read_file("--text-file", o.text_file);
  Loaded l;
  load_tokenizer_only(o.model, l);
  const int32_t flags = DSRT_TOKENIZE_PARSE_SPECIAL | (o.add_special ? DSRT_TOKENIZE_ADD_SPECIAL : 0);
  size_t n = 0;
  dsrt_status st = dsrt_tokenize(l.model, text.data(), text.size(), flags, nullptr, 0, &n);
  if (st != DSRT_OK && st != DSRT_ERR_BUFFER_TOO_SMALL) check(st);
  std::vector<int32_t> ids(n);
  check(dsrt_tokenize(l.model, text.data(), text.size(), flags, ids.data(), ids.size(), &n));
  std::string line;
  for (size_t i = 0; i < n; i++) line += (i ? "," : "") + std::to_string(ids[i]);
  std::printf("%s\n", line.c_str());
  return 0;
}

int run_template(const TextOptions &o) {
  const std::string messages = read_file("--messages", o.messages);
  const std::string tools = o.tools.empty() ? "" : read_file("--tools", o.tools);
  const std::string kwargs = o.kwargs.empty() ? "" : read_file("--kwargs", o.kwargs);
  Loaded l;
  load_tokenizer_only(o.model, l);
  char *out = nullptr;
  size_t len = 0;  // a message's content may hold U+0000: print every byte of the prompt
  check(dsrt_chat_apply_n(l.model, messages.c_str(), tools.empty() ? nullptr : tools.c_str(),
                          kwargs.empty() ? nullptr : kwargs.c_str(),
                          o.add_generation_prompt ? DSRT_CHAT_ADD_GENERATION_PROMPT : 0, &out, &len));
  std::fwrite(out, 1, len, stdout);
  dsrt_free(out);
  return 0;
}

int run_bench_tokenizer(const TextOptions &o) {
  const std::string text = read_file("--text-file", o.text_file);
  Loaded l;
  load_tokenizer_only(o.model, l);
  std::vector<int32_t> ids(text.size() + 16);
  double best = 1e30;
  size_t n = 0;
  for (int r = 0; r < o.repeat; r++) {
    auto t0 = std::chrono::steady_clock::now();
    check(dsrt_tokenize(l.model, text.data(), text.size(), 0, ids.data(), ids.size(), &n));
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("encoded %zu bytes into %zu tokens: %.1f MB/s (best of %d runs, one thread)\n", text.size(), n,
              double(text.size()) / best / 1e6, o.repeat);
  return 0;
}

}  // namespace

void add_text_commands(CLI::App &app, int &rc) {
  {
    auto o = std::make_shared<TextOptions>();
    auto *cmd = app.add_subcommand("tokenize", "print the ids of a file's text");
    cmd->footer("Prints the ids of FILE's exact bytes comma-separated on one line. Special-token strings in the text\n"
                "are matched as special tokens (as Hugging Face tokenizers does); BOS/EOS are added only with\n"
                "--add-special. Needs only config.json and the tokenizer files.");
    add_model(*cmd, *o);
    cmd->add_option("--text-file", o->text_file, "the text")->required()->type_name("FILE");
    cmd->add_flag("--add-special", o->add_special, "add BOS/EOS as tokenizer_config.json asks");
    cmd->callback([o, &rc] { rc = run_tokenize(*o); });
  }
  {
    auto o = std::make_shared<TextOptions>();
    auto *cmd = app.add_subcommand("template", "print the chat template's rendering of messages");
    cmd->footer("Prints exactly the prompt the model's chat template renders for the messages, nothing else.");
    add_model(*cmd, *o);
    cmd->add_option("--messages", o->messages, "the messages, a JSON array")->required()->type_name("FILE.json");
    cmd->add_option("--tools", o->tools, "tool definitions, a JSON array")->type_name("FILE.json");
    cmd->add_option("--kwargs", o->kwargs, "extra template variables, a JSON object")->type_name("FILE.json");
    cmd->add_flag("--add-generation-prompt", o->add_generation_prompt, "end with the assistant's turn opening");
    cmd->callback([o, &rc] { rc = run_template(*o); });
  }
  {
    auto o = std::make_shared<TextOptions>();
    auto *cmd = app.add_subcommand("bench-tokenizer", "tokenizer encode speed");
    cmd->footer("Encode speed in MB/s on one thread (the text is encoded N times; the best run counts).");
    add_model(*cmd, *o);
    cmd->add_option("--text-file", o->text_file, "the text")->required()->type_name("FILE");
    cmd->add_option("--repeat", o->repeat, "runs")->check(CLI::Range(1, 1000000));
    cmd->callback([o, &rc] { rc = run_bench_tokenizer(*o); });
  }
}

}  // namespace dsrt::cli
