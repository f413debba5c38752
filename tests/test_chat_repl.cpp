// samples/chat driven as a person would: through a pseudo-terminal (prompt, streaming, Ctrl-C, commands),
// and with piped stdin for scripting. Also the CLI's text forms (tokenize, template, generate --prompt).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "helpers.h"

using namespace testing;

namespace {

struct Pty {
  int fd = -1;
  pid_t pid = -1;
  std::string out;

  explicit Pty(const std::vector<std::string> &argv) {
    pid = forkpty(&fd, nullptr, nullptr, nullptr);
    REQUIRE(pid >= 0);
    if (pid == 0) {
      std::vector<char *> a;
      for (auto &s : argv) a.push_back(const_cast<char *>(s.c_str()));
      a.push_back(nullptr);
      setenv("NO_COLOR", "1", 1);
      execv(a[0], a.data());
      _exit(127);
    }
  }
  ~Pty() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (fd >= 0) close(fd);
  }
  // Reads until `needle` appears after position `from` (returns its end) or the timeout passes (npos).
  size_t wait_for(const std::string &needle, size_t from, double seconds = 60) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    for (;;) {
      size_t p = out.find(needle, from);
      if (p != std::string::npos) return p + needle.size();
      auto left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
      if (left <= 0) return std::string::npos;
      pollfd pf{fd, POLLIN, 0};
      if (poll(&pf, 1, int(std::min(left, 0.2) * 1000)) > 0) {
        char buf[4096];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) return out.find(needle, from) == std::string::npos ? std::string::npos : out.find(needle, from) + needle.size();
        out.append(buf, size_t(n));
      }
    }
  }
  void send(const std::string &s) { REQUIRE(write(fd, s.data(), s.size()) == ssize_t(s.size())); }
  int wait_exit(double seconds = 30) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      int status;
      char buf[4096];
      pollfd pf{fd, POLLIN, 0};
      while (poll(&pf, 1, 0) > 0) {  // drain what is there without blocking
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) break;
        out.append(buf, size_t(n));
      }
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      usleep(20000);
    }
    return -1;
  }
};

std::string run_capture(const std::string &cmd, int *code) {
  FILE *p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  *code = WEXITSTATUS(st);
  return out;
}

}  // namespace

TEST_CASE("chat REPL through a pseudo-terminal: prompt, streaming, Ctrl-C stops a reply, commands, Ctrl-C exits") {
  const std::string model = tiny("v3-mini");
  fs::path save = fresh_dir("repl") / "conv.bin";
  Pty t({DSRT_CHAT_PATH, model, "--temperature", "0", "--max-tokens", "100000", "--threads", "2"});
  size_t at = t.wait_for("> ", 0);
  REQUIRE(at != std::string::npos);
  t.send("Tell me a long story\r");
  size_t reply = t.wait_for("story\r\n", at);  // the terminal's echo of what we typed
  REQUIRE(reply != std::string::npos);
  // Wait until the reply is streaming (the REPL has read the line and is generating), then stop it: the
  // program stays and prompts again.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (t.out.size() <= reply + 2 && std::chrono::steady_clock::now() < deadline) t.wait_for("\x01", reply, 0.2);
  REQUIRE(t.out.size() > reply + 2);
  t.send("\x03");
  size_t stopped = t.wait_for("[stopped]", reply, 30);
  CHECK(stopped != std::string::npos);
  at = t.wait_for("> ", stopped == std::string::npos ? reply : stopped);
  REQUIRE(at != std::string::npos);
  t.send("/stats\r");
  size_t st = t.wait_for("time to first token", at);
  CHECK(st != std::string::npos);
  at = t.wait_for("> ", st);
  t.send("/save " + save.string() + "\r");
  CHECK(t.wait_for("(saved", at) != std::string::npos);
  at = t.wait_for("> ", at);
  t.send("/load " + save.string() + "\r");
  CHECK(t.wait_for("(conversation loaded", at) != std::string::npos);
  at = t.wait_for("> ", at);
  t.send("/help\r");
  CHECK(t.wait_for("/undo", at) != std::string::npos);
  at = t.wait_for("> ", at);
  t.send("\x03");  // Ctrl-C at an empty prompt leaves
  CHECK(t.wait_exit() == 0);
  CHECK(fs::file_size(save) > 1000);
}

TEST_CASE("chat REPL with piped stdin prints only the replies") {
  const std::string model = tiny("no-qlora");
  int code;
  std::string out = run_capture("printf 'Hello\\n/stats\\nSecond message\\n' | " + std::string(DSRT_CHAT_PATH) + " " + model +
                                    " --temperature 0 --max-tokens 8 2>/dev/null",
                                &code);
  CHECK(code == 0);
  CHECK(out.find("> ") == std::string::npos);  // no prompt when not interactive
  CHECK(out.find("context ") != std::string::npos);
  CHECK(std::count(out.begin(), out.end(), '\n') >= 3);
}

TEST_CASE("dsrt tokenize and dsrt template: exact public forms") {
  const std::string model = tiny("no-qlora");
  fs::path d = fresh_dir("cli-text");
  {
    std::ofstream(d / "t.txt", std::ios::binary) << "Hello <｜User｜> world";
    std::ofstream(d / "m.json") << R"([{"role":"system","content":"S"},{"role":"user","content":"Hi"}])";
  }
  int code;
  std::string ids = run_capture(std::string(DSRT_CLI_PATH) + " tokenize --model " + model + " --text-file " + (d / "t.txt").string(), &code);
  CHECK(code == 0);
  Model m(model);
  std::vector<int32_t> want(64);
  size_t n;
  const std::string text = "Hello <｜User｜> world";
  CHECK_OK(dsrt_tokenize(m.m, text.data(), text.size(), DSRT_TOKENIZE_PARSE_SPECIAL, want.data(), want.size(), &n));
  std::string line;
  for (size_t i = 0; i < n; i++) line += (i ? "," : "") + std::to_string(want[i]);
  CHECK(ids == line + "\n");
  std::string with_bos = run_capture(std::string(DSRT_CLI_PATH) + " tokenize --model " + model + " --text-file " +
                                         (d / "t.txt").string() + " --add-special", &code);
  CHECK(with_bos == "0," + line + "\n");
  std::string prompt = run_capture(std::string(DSRT_CLI_PATH) + " template --model " + model + " --messages " +
                                       (d / "m.json").string() + " --add-generation-prompt", &code);
  CHECK(code == 0);
  CHECK(prompt == "<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜>");
  std::string streamed = run_capture(std::string(DSRT_CLI_PATH) + " generate --model " + model +
                                         " --prompt Hello -n 8 --temperature 0 2>/dev/null", &code);
  CHECK(code == 0);
  CHECK(!streamed.empty());
}
