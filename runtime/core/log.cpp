#include "core/log.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dsrt {
namespace {
std::mutex g_mu;
LogSink g_sink = nullptr;
void *g_user = nullptr;
}  // namespace

// Without a callback, stderr gets warnings and errors only, or what DSRT_LOG_LEVEL (debug, info, warn,
// error) asks for; DSRT_DEBUG_GEMM (per-GEMM path lines) implies debug.
static LogLevel stderr_threshold() {
  static const LogLevel t = [] {
    const char *v = std::getenv("DSRT_LOG_LEVEL");
    if (std::getenv("DSRT_DEBUG_GEMM") || (v && !std::strcmp(v, "debug"))) return LogLevel::Debug;
    if (v && !std::strcmp(v, "info")) return LogLevel::Info;
    if (v && !std::strcmp(v, "error")) return LogLevel::Error;
    return LogLevel::Warn;
  }();
  return t;
}

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
  if (level >= stderr_threshold()) std::fprintf(stderr, "%s\n", message.c_str());
}

}  // namespace dsrt
