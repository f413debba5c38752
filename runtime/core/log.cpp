#include "core/log.h"

#include <cstdio>
#include <mutex>

namespace dsrt {
namespace {
std::mutex g_mu;
LogSink g_sink = nullptr;
void *g_user = nullptr;
}  // namespace

void set_log_sink(LogSink sink, void *user) {
  std::lock_guard lk(g_mu);
  g_sink = sink;
  g_user = user;
}

void log(LogLevel level, const std::string &message) {
  std::lock_guard lk(g_mu);  // one message at a time, also to the host's callback
  if (g_sink) {
    g_sink(int(level), message.c_str(), g_user);
    return;
  }
  std::fprintf(stderr, "%s\n", message.c_str());
}

}  // namespace dsrt
