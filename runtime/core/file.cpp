#include "core/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/json.h"
#include "core/status.h"

namespace dsrt {

bool file_exists(const std::string &path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return false;
  if (!S_ISREG(st.st_mode)) failf(DSRT_ERR_IO, path, ": not a regular file (a FIFO, device, socket or directory)");
  return true;
}

namespace {
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace

std::string read_text_file(const std::string &path, uint64_t max_bytes) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, before fstat could refuse it.
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (f.fd < 0) failf(DSRT_ERR_IO, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (::fstat(f.fd, &st) != 0) failf(DSRT_ERR_IO, path, ": cannot stat (", std::strerror(errno), ")");
  if (!S_ISREG(st.st_mode)) failf(DSRT_ERR_IO, path, ": not a regular file (a FIFO, device, socket or directory)");
  if (uint64_t(st.st_size) > max_bytes)
    failf(DSRT_ERR_FORMAT, path, ": ", uint64_t(st.st_size), " bytes, more than the ", max_bytes, " allowed for this file");
  std::string text(size_t(st.st_size), '\0');
  size_t got = 0;
  // Read to the end even if the file grew since fstat, but never past the cap.
  for (;;) {
    if (got == text.size()) {
      if (text.size() >= max_bytes) {
        char probe;
        ssize_t r = ::read(f.fd, &probe, 1);
        if (r > 0) failf(DSRT_ERR_FORMAT, path, ": more than the ", max_bytes, " bytes allowed for this file");
        if (r == 0) break;
        if (errno == EINTR) continue;
        failf(DSRT_ERR_IO, path, ": read error (", std::strerror(errno), ")");
      }
      text.resize(size_t(std::min<uint64_t>(max_bytes, std::max<uint64_t>(4096, uint64_t(text.size()) * 2))));
    }
    ssize_t r = ::read(f.fd, text.data() + got, text.size() - got);
    if (r == 0) break;
    if (r < 0) {
      if (errno == EINTR) continue;
      failf(DSRT_ERR_IO, path, ": read error (", std::strerror(errno), ")");
    }
    got += size_t(r);
  }
  text.resize(got);
  return text;
}


nlohmann::json read_json_file(const std::string &path, uint64_t max_bytes, bool want_object) {
  const std::string text = read_text_file(path, max_bytes);
  const nlohmann::json j = parse_json_sorted(text, path.c_str(), DSRT_ERR_FORMAT);
  if (want_object && !j.is_object()) failf(DSRT_ERR_FORMAT, path, ": not a JSON object");
  return j;
}

}  // namespace dsrt
