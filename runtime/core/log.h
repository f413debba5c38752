// The library's log: one process-wide sink, stderr unless the host installs a callback
// (dsrt_set_log_callback). The library never writes to stderr on its own otherwise.
#pragma once
#include <string>

namespace dsrt {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };  // DSRT_LOG_* in dsrt.h

using LogSink = void (*)(int level, const char *message, void *user);
// Installs the sink (null: back to stderr). Thread-safe; a message being written finishes first.
void set_log_sink(LogSink sink, void *user);
void log(LogLevel level, const std::string &message);

}  // namespace dsrt
